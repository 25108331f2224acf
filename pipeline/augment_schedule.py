"""How an augmentation op runs: the one scheduler of every policy.

Ops only declare what they are (augment_ops.Op: `pointwise`, `maskable`,
`sparse`, `variants`, `host`, `reads_labels`, `static_args`; composites their
`kind`) and implement one transform. `run(op, images, labels, seeds, static)`
runs any op, leaf or composite, and `path(op, images)` is the one place that
picks its execution path from those traits:

  leaves
    "identity"  the images as they are;
    "leaf"      the op's transform (with its `static_args` in the static
                schedule: the blurs' tap sums, the median without buckets);
    "variants"  an op with per-image variants of its transform (noise: per
                channel or shared): grouped, each variant on its own rows;
                static, every variant on every image and a per-image select;
    "hits"      a sparse op (dropout, pepper, salt) at a known size and small
                p: grouped, a list of hits and one scatter; static, the same
                hits as dense per-pixel masks;
  composites
    "sequence"  steps in order;
    "masked"    a Sometimes of a maskable or pointwise op: the whole batch,
                the op masked off for the images not chosen (its own masked
                transform, or x + chosen * (op(x) - x) in one XLA kernel);
    "dense"     a OneOf of pointwise ops: every branch on every image and a
                per-image select, in ONE XLA kernel (elementwise chains fuse);
    "scatter"   a OneOf of sparse ops: every branch's hits, written at once;
    "grouped"   any other OneOf: grouped, each branch only on the rows that
                chose it; static, every branch on the whole batch and a select.

The grouped schedule (`static=False`, the host's: tf.data, a CPU) may regroup
rows: `run_grouped` sorts the rows by choice, runs each branch on its own
contiguous group and concatenates the groups, without putting the rows back;
every row keeps its image, label, seed and original index together, so a
sequence restores the batch order once, at its end (`restore_order`). The
static schedule (`static=True`, for XLA and accelerators) has no shape that
depends on the data. Both draw the same numbers and give the same values
(float rounding only).
"""
import numpy as np
import tensorflow as tf

from upright.pipeline import per_image_random as rnd

# Our ops have no tensor-dependent Python control flow; keeping AutoGraph out
# of them makes tracing a policy (tf.data map, tf.function, Keras) much faster.
plain = tf.autograph.experimental.do_not_convert

# XLA-compiled kernels of dense OneOf / masked Sometimes steps, shared by every
# policy object with the same spec and seed path (parse_policy is called by the
# input function and the trainer alike): each compiles once per process and shape.
_XLA_CACHE = {}


def path(op, images) -> str:
    """The execution path of `op` on `images` (see the module doc)."""
    if op.kind == "leaf":
        if op.identity:
            return "identity"
        if op.variants > 1:
            return "variants"
        return "hits" if op.sparse and op.sparse_ok(images) else "leaf"
    if op.kind == "sequence":
        return "sequence"
    first = op.ops[0]
    if op.kind == "optional" and (first.maskable or first.pointwise):
        return "masked"
    if all(branch.pointwise for branch in op.ops):
        return "dense"
    if all(branch.sparse and branch.sparse_ok(images) for branch in op.ops):
        return "scatter"
    return "grouped"


@plain
def run(op, images, labels, seeds, static=False):
    """op on a batch: (images, labels) in batch order.

    images float32 [B, S, S, 3] in [0, 255], labels int32 [B], seeds int32
    [B, 2]; `static` picks the static schedule (no data-dependent shapes).
    """
    images = tf.convert_to_tensor(images, tf.float32)
    if static:
        return _STATIC[path(op, images)](op, images, labels, seeds)
    if not _regroups(op, images):
        return _GROUPED[path(op, images)](op, images, labels, seeds)
    # Rows may be regrouped by every choice inside; put them back once.
    index = tf.range(tf.shape(images)[0])
    images, labels, _, index = _unordered(op, images, labels, seeds, index)
    return restore_order(images, labels, index)


def _regroups(op, images) -> bool:
    """Whether op's grouped path may hand its rows back in another order."""
    kind = path(op, images)
    if kind == "sequence":
        return any(_regroups(child, images) for child in op.ops)
    return kind in ("grouped", "variants")


def _unordered(op, images, labels, seeds, index):
    """Runs op in the grouped schedule; its outputs may come back in any order
    of the batch, each row with its image, label, seed and `index` (int32 [B],
    the row's position in the caller's batch). Returns all four."""
    images = tf.convert_to_tensor(images, tf.float32)
    kind = path(op, images)
    if kind == "sequence":
        for child in op.ops:
            images, labels, seeds, index = _unordered(child, images, labels, seeds, index)
        return images, labels, seeds, index
    if kind == "grouped":
        branches = [None if branch.identity else _unordered_runner(branch)
                    for branch in op.ops]
        return run_grouped(branches, op.choose(seeds), images, labels, seeds, index)
    if kind == "variants":
        branches = [_variant_runner(op, v) for v in range(op.variants)]
        u = rnd.uniforms(rnd.fold_seeds(seeds, op.salt), op.num_params)
        return run_grouped(branches, op.variant(u), images, labels, seeds, index)
    images, labels = _GROUPED[kind](op, images, labels, seeds)
    return images, labels, seeds, index


def _unordered_runner(op):
    return lambda x, y, s, i: _unordered(op, x, y, s, i)


def _variant_runner(op, variant):
    def one(x, y, s, i):
        x, y = _transform(op, tf.convert_to_tensor(x, tf.float32), y, s, variant=variant)
        return x, y, s, i
    return one


@plain
def run_grouped(branches, choice, images, labels, seeds, index):
    """Runs branches[i] on the rows with choice == i, without restoring order.

    branches: callables (images, labels, seeds, index) -> the same four, or
    None for an identity (its rows pass untouched). The rows are sorted by
    choice (one gather), split into contiguous groups (no copy), each group
    goes through its branch only, and the groups are concatenated: two passes
    over the batch, about half of what dynamic_partition + dynamic_stitch
    cost on a CPU. Returns (images, labels, seeds, index) grouped by branch.
    """
    n = len(branches)
    if n == 1:
        if branches[0] is None:
            return tf.convert_to_tensor(images, tf.float32), labels, seeds, index
        return branches[0](images, labels, seeds, index)
    order = tf.argsort(choice, stable=True)
    sizes = tf.math.bincount(choice, minlength=n, maxlength=n, dtype=tf.int32)

    def groups(t):
        return tf.split(tf.gather(t, order), sizes, num=n)

    outs = []
    for branch, x, y, s, i in zip(branches, groups(images), groups(labels), groups(seeds),
                                  groups(index)):
        outs.append((x, y, s, i) if branch is None else branch(x, y, s, i))
    return tuple(tf.concat(list(parts), 0) for parts in zip(*outs))


def restore_order(images, labels, index):
    """Puts rows back in batch order: row j goes to position index[j]."""
    inverse = tf.math.invert_permutation(index)
    return tf.gather(images, inverse), tf.gather(labels, inverse)


# ---------------------------------------------------------------- leaves

def _identity(op, images, labels, seeds):
    return images, labels


def _transform(op, images, labels, seeds, **form):
    """A leaf's transform: fold the seeds, draw the per-image parameters,
    transform, clip. `form` (the static arguments, a mask `chosen`, a
    `variant`) goes to the transform, with the labels for an op that reads them."""
    seeds = rnd.fold_seeds(seeds, op.salt)
    u = rnd.uniforms(seeds, op.num_params) if op.num_params else None
    if op.reads_labels:
        form["labels"] = labels
    out = op.transform(images, seeds, u, **form)
    return (tf.clip_by_value(out, 0.0, 255.0) if op.clips else out), labels


def _leaf(op, images, labels, seeds):
    return _transform(op, images, labels, seeds)


def _leaf_static(op, images, labels, seeds):
    return _transform(op, images, labels, seeds, **op.static_args)


def _variants_static(op, images, labels, seeds):
    """Every variant on every image, then a per-image select (one XLA pass
    when traced for XLA)."""
    folded = rnd.fold_seeds(seeds, op.salt)
    u = rnd.uniforms(folded, op.num_params)
    choice = op.variant(u)
    out = _select(choice, lambda v: (op.transform(images, folded, u, variant=v),),
                  op.variants)[0]
    return (tf.clip_by_value(out, 0.0, 255.0) if op.clips else out), labels


def _select(choice, make, n):
    """For each image b, make(choice[b]) (a tuple of per-image tensors): every
    make(i) is computed on the whole batch, from n - 1 down to 0."""
    out = make(n - 1)
    for i in range(n - 2, -1, -1):
        pick = tf.equal(choice, i)
        out = tuple(tf.where(tf.reshape(pick, [-1] + [1] * (len(o.shape) - 1)), t, o)
                    for t, o in zip(make(i), out))
    return out


# ---------------------------------------------------------------- sparse hits

def _hit_list(op, images, seeds, chosen=None):
    """A sparse op's replaced pixels: (index int32 [K, 3] of (image, row,
    col), value float32 [K]). `seeds` are the caller's (unfolded) seeds;
    images where `chosen` (bool [B]) is False get no hits."""
    h, w, max_hits, count, keys, pos = op.candidates(images, seeds, chosen)
    keep = tf.range(max_hits, dtype=tf.float32)[None, :] < count[:, None]
    where = tf.where(keep)                                    # [K, 2] (image, j)
    image = tf.cast(where[:, 0], tf.int32)
    pos = tf.gather_nd(pos, where)
    # The value comes from the position's own hash: equal for duplicates.
    value = op.value(rnd.bits_to_uniform(rnd.hash_bits(tf.gather(keys, image),
                                                       tf.bitcast(pos, tf.uint32))))
    return tf.stack([image, pos // w, pos % w], 1), value


def _hit_masks(op, images, seeds, chosen=None):
    """The hits of `_hit_list` as dense per-pixel arrays, static shapes only:
    (hit bool [B, H, W, 1], value float32 [B, H, W, 1]). The same draws:
    every image keeps all max_hits candidate positions and counts only the
    first `count` (a scatter-add, instead of tf.where's dynamic list), and a
    hit's value is a function of its position, so it can be computed for
    every pixel and selected where hit."""
    h, w, max_hits, count, keys, pos = op.candidates(images, seeds, chosen)
    keep = tf.cast(tf.range(max_hits, dtype=tf.float32)[None, :] < count[:, None], tf.float32)
    b = tf.shape(images)[0]
    flat = tf.reshape(tf.range(b)[:, None] * (h * w) + pos, [-1, 1])
    hit = tf.scatter_nd(flat, tf.reshape(keep, [-1]), [b * h * w]) > 0.0
    counters = tf.constant(np.arange(h * w, dtype=np.uint32))
    value = op.value(rnd.bits_to_uniform(rnd.hash_bits(keys[:, None], counters[None, :])))
    return tf.reshape(hit, [-1, h, w, 1]), tf.reshape(value, [-1, h, w, 1])


def scatter_hits(images, hit_lists):
    """Writes (index [K, 3], value [K]) hit lists into images, all channels.

    Duplicate positions carry equal values, so the update order is moot.
    """
    index = tf.concat([i for i, _ in hit_lists], 0)
    value = tf.concat([v for _, v in hit_lists], 0)
    channels = images.shape[3] or tf.shape(images)[3]
    return tf.tensor_scatter_nd_update(images, index,
                                       tf.tile(value[:, None], tf.stack([1, channels])))


def _hits(op, images, labels, seeds):
    return scatter_hits(images, [_hit_list(op, images, seeds)]), labels


def _hits_static(op, images, labels, seeds):
    hit, value = _hit_masks(op, images, seeds)
    return tf.where(hit, value, images), labels


def _scatter(op, images, labels, seeds):
    """Sparse branches: every branch lists the hits of its own images, and one
    scatter writes them all (no regrouping)."""
    choice = op.choose(seeds)
    hit_lists = [_hit_list(branch, images, seeds, tf.equal(choice, i))
                 for i, branch in enumerate(op.ops)]
    return scatter_hits(images, hit_lists), labels


def _scatter_static(op, images, labels, seeds):
    choice = op.choose(seeds)
    # Branch images are disjoint: each writes its hits over the others.
    for i, branch in enumerate(op.ops):
        hit, value = _hit_masks(branch, images, seeds, tf.equal(choice, i))
        images = tf.where(hit, value, images)
    return images, labels


# ---------------------------------------------------------------- composites

def _sequence(op, images, labels, seeds):
    for child in op.ops:
        images, labels = run(child, images, labels, seeds)
    return images, labels


def _sequence_static(op, images, labels, seeds):
    xla = in_xla_context()
    for i, child in enumerate(op.ops):
        if xla and i:
            images = _materialize(images)
        images, labels = run(child, images, labels, seeds, static=True)
    return images, labels


def _branches_static(op, images, labels, seeds):
    """Every branch on the whole batch, then a per-image select by the same
    choice (no regrouping, no gathers)."""
    branches = op.ops
    return _select(op.choose(seeds),
                   lambda i: run(branches[i], images, labels, seeds, static=True),
                   len(branches))


def _dense(op, images, labels, seeds):
    """All (pointwise) branches on every image, then a per-image select, in
    one XLA kernel: the elementwise chains fuse into one pass, which on a CPU
    beats regrouping the batch for cheap branches."""
    key = ("dense", op.spec(), op.salt)
    if key not in _XLA_CACHE:
        branches = op.ops

        @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
        def dense(images, seeds, choice):
            labels = tf.zeros(tf.shape(images)[:1], tf.int32)
            return _select(choice, lambda i: run(branches[i], images, labels, seeds,
                                                 static=True)[:1], len(branches))[0]

        _XLA_CACHE[key] = dense
    return _XLA_CACHE[key](images, seeds, op.choose(seeds)), labels


def _masked(op, images, labels, seeds):
    """A Sometimes over the whole batch: the op on the chosen images, identity
    on the others. A maskable op's own masked transform, or for a pointwise
    op x + chosen * (op(x) - x) in one XLA kernel (exact for the others)."""
    first = op.ops[0]
    chosen = tf.equal(op.choose(seeds), 0)
    if first.maskable:
        return _transform(first, images, labels, seeds, chosen=chosen)
    key = ("masked", op.spec(), op.salt)
    if key not in _XLA_CACHE:

        @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
        def masked(images, seeds, chosen):
            labels = tf.zeros(tf.shape(images)[:1], tf.int32)
            out = run(first, images, labels, seeds, static=True)[0]
            weight = tf.reshape(tf.cast(chosen, tf.float32), [-1, 1, 1, 1])
            return images + weight * (out - images)

        _XLA_CACHE[key] = masked
    return _XLA_CACHE[key](images, seeds, chosen), labels


# Path -> how it runs in each schedule. "grouped" and "variants" regroup rows:
# in the grouped schedule they run through _unordered only.
_GROUPED = {"identity": _identity, "leaf": _leaf, "hits": _hits, "sequence": _sequence,
            "masked": _masked, "dense": _dense, "scatter": _scatter}
_STATIC = {"identity": _identity, "leaf": _leaf_static, "variants": _variants_static,
           "hits": _hits_static, "sequence": _sequence_static, "masked": _masked,
           "dense": _dense, "scatter": _scatter_static, "grouped": _branches_static}


# ---------------------------------------------------------------- XLA helpers

def _materialize(images):
    """images, bit for bit, as a buffer XLA must write out before the next step.

    Every step of the static schedule reads its input several times (one read
    per branch, plus selects), and XLA fuses a cheap-looking producer into
    each consumer: on its CPU backend the default policy's steps, chained,
    cost ~50x their sum (hue_saturation then noise: 44 ms vs 9 + 6 per batch
    of 32 at 128 px; the whole device part ~9 s vs ~0.2-0.4 s with this).
    An XlaOptimizationBarrier did not stop it; a dot does, since XLA does not
    fuse elementwise producers into it. Integer (the bits of the floats times
    an int32 identity) so that it stays exact where float matmuls round
    (TF32 on recent GPUs).
    """
    bits = tf.bitcast(images, tf.int32)
    bits = tf.einsum("bhwc,cd->bhwd", bits, tf.eye(images.shape[-1], dtype=tf.int32))
    return tf.bitcast(bits, tf.float32)


SCHEDULES = ("auto", "static", "grouped")


def resolve(schedule: str) -> str:
    """"static" or "grouped" for a requested schedule (one of SCHEDULES): "auto"
    is static when the trace under way is for XLA or a GPU/TPU is visible (an
    accelerator has compute to spare and would stall on grouped rows' shapes),
    grouped otherwise (a CPU does only each branch's own images)."""
    if schedule != "auto":
        return schedule
    if in_xla_context():
        return "static"
    accelerators = (tf.config.list_physical_devices("GPU")
                    + tf.config.list_physical_devices("TPU"))
    return "static" if accelerators else "grouped"


def in_xla_context() -> bool:
    """Whether the graph being traced is for XLA: a tf.function with
    jit_compile=True (Keras' compiled train step) or one nested in it.
    TensorFlow's own ops ask the same question of control_flow_util."""
    from tensorflow.python.ops import control_flow_util
    return (not tf.executing_eagerly() and
            control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
