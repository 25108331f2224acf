"""How a batch runs through ops that regroup its rows: the grouped schedule.

A OneOf (augment.py) computes a branch only for the images that chose it:
`run_grouped` sorts the rows by choice, runs each branch on its own contiguous
group and concatenates them, without putting the rows back; every row keeps its
image, label, seed and original index together (`call_unordered`), so a
Sequential restores the batch order once, at its end (`restore_order`).
`apply_partitioned` is the same with the order restored. `scatter_hits` writes
the sparse ops' hit lists of all branches with one scatter.

The other schedules (a fused OneOf run densely in one XLA kernel, a masked
Sometimes on the whole batch, the static call_static schedule) are methods of
OneOf and Sometimes in augment.py.
"""
import tensorflow as tf


def call_unordered(op, images, labels, seeds, index):
    """Runs op; its outputs may come back in any order of the batch.

    Every row keeps its image, label, seed and `index` (int32 [B], the row's
    position in the caller's batch) together, so the caller can restore the
    order once, at the end (`restore_order`), instead of after every OneOf.
    """
    if hasattr(op, "call_unordered"):
        return op.call_unordered(images, labels, seeds, index)
    images, labels = op(images, labels, seeds)
    return images, labels, seeds, index


@tf.autograph.experimental.do_not_convert
def run_grouped(branches, choice, images, labels, seeds, index):
    """Runs branches[i] on the rows with choice == i, without restoring order.

    The rows are sorted by choice (one gather), split into contiguous groups
    (no copy), each group goes through its branch only, and the groups are
    concatenated: two passes over the batch, about half of what
    dynamic_partition + dynamic_stitch cost on a CPU. Returns (images,
    labels, seeds, index) grouped by branch.
    """
    n = len(branches)
    if n == 1:
        return call_unordered(branches[0], images, labels, seeds, index)
    order = tf.argsort(choice, stable=True)
    sizes = tf.math.bincount(choice, minlength=n, maxlength=n, dtype=tf.int32)

    def groups(t):
        return tf.split(tf.gather(t, order), sizes, num=n)

    outs = []
    for op, x, y, s, i in zip(branches, groups(images), groups(labels), groups(seeds),
                              groups(index)):
        if not getattr(op, "identity", False):
            x, y, s, i = call_unordered(op, x, y, s, i)
        outs.append((x, y, s, i))
    return tuple(tf.concat(list(parts), 0) for parts in zip(*outs))


def restore_order(images, labels, index):
    """Puts rows back in batch order: row j goes to position index[j]."""
    inverse = tf.math.invert_permutation(index)
    return tf.gather(images, inverse), tf.gather(labels, inverse)


@tf.autograph.experimental.do_not_convert
def apply_partitioned(branches, choice, images, labels, seeds):
    """Runs branches[i] on the images with choice == i; results in batch order.

    choice int32 [B] in [0, len(branches)); branches are callables
    (images, labels, seeds) -> (images, labels) (an Identity is skipped).
    Each branch computes only its own images.
    """
    index = tf.range(tf.shape(images)[0])
    images, labels, _, index = run_grouped(branches, choice, images, labels, seeds, index)
    return restore_order(images, labels, index)


def scatter_hits(images, hit_lists):
    """Writes (index [K, 3], value [K]) hit lists into images, all channels.

    Duplicate positions carry equal values, so the update order is moot.
    """
    index = tf.concat([i for i, _ in hit_lists], 0)
    value = tf.concat([v for _, v in hit_lists], 0)
    channels = images.shape[3] or tf.shape(images)[3]
    return tf.tensor_scatter_nd_update(images, index,
                                       tf.tile(value[:, None], tf.stack([1, channels])))
