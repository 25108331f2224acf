"""Batched, per-image, seeded augmentation: policies, placements, the Keras layer.

Modules: augment.py (this: composition, spec parser, placements,
AugmentLayer), augment_ops.py (the leaf ops: traits and one transform each),
augment_schedule.py (the one scheduler: picks how every op runs),
image_filters.py (the ops' convolutions, medians and warps),
per_image_random.py (seeded random numbers).

Every op (see augment_ops.py for the leaves) is a callable

    op(images, labels, seeds) -> (images, labels)
    images float32 [B, S, S, 3] in [0, 255] (outputs clipped to [0, 255]),
    labels int32 [B] in [0, 4), seeds int32 [B, 2] (one stateless seed per image).

Random parameters are drawn PER IMAGE from that image's seed (with a constant
per op position folded in), so an image's result never depends on the rest of
its batch. Composition: Sequential([...]), OneOf([...]) (each image picks its
own branch), Sometimes(p, op). How a step runs is chosen, from the traits the
ops declare, by augment_schedule.path alone, for speed on a CPU, never
changing the values beyond float rounding:
  * a OneOf whose branches are all pointwise (colour/contrast ops,
    additive noise) runs every branch on every image and selects per image,
    in ONE XLA-compiled kernel (elementwise chains fuse into one pass);
  * a Sometimes of a pointwise or maskable op (rotate, frequency_blend) runs
    on the whole batch with the op masked off (x + chosen * (op(x) - x);
    angle 0) for the others;
  * a OneOf of sparse ops (dropout, pepper, salt) writes all hits at once;
  * any other OneOf computes a branch only for the images that chose it:
    rows are grouped by choice with one gather, and a Sequential restores the
    batch order once, at its end.
That is the host (grouped) schedule. `op.call_static(...)` is the static
schedule, for XLA and accelerators (AugmentLayer picks it when its step is
compiled or a GPU/TPU is visible): every branch of a OneOf/Sometimes runs on
the whole batch and a per-image select keeps the chosen one; sparse ops write
their hits as dense masks; no shape depends on the data. Same draws, same
values (float rounding only).

Policy spec strings (`parse_policy`)
------------------------------------
    "default"   the source article's sequence (DEFAULT_SPEC below)
    "none"      identity
    otherwise   steps separated by ';' run in order; alternatives separated
                by '|' form a OneOf (uniform choice per image); each
                alternative is `name` or `name(arg, ...)` with numbers;
                `sometimes(p, STEPS)` applies STEPS to a fraction p of images;
                `default` and `none` may appear as steps; parentheses group
                steps (as `spec()` writes a nested sequence).
    e.g. "add(-20,20)|multiply; gaussian_blur(0.5,1); sometimes(0.5, jpeg(60,80))"
    Arguments are optional (defaults below), positional or keyword with the
    parameter names below: "frequency_blend(exp_lo=0, exp_hi=1)". One number
    for a range op fixes it: "add(10)" adds exactly 10. Names are
    case-insensitive. The string is read with Python's `ast` and never
    evaluated: arguments must be number literals.
An unknown name raises ValueError listing the known op names; a bad argument
raises ValueError naming the op and the argument.

Ops, arguments and defaults (ranges in OUTPUT pixels, see mapping):
    add(lo=-15, hi=15)            multiply(lo=0.8, hi=1.2)
    hue_saturation(lo=0.8, hi=1.1)
    gaussian_noise(lo=0.02, hi=12.75, per_channel=0.5)    scale, grey levels
    laplace_noise(lo=0.02, hi=12.75, per_channel=0.5)
    poisson_noise(lo=8, hi=16, per_channel=0.5)           lam
    dropout(p=0.005)  pepper(p=0.005)  salt(p=0.01)
    frequency_blend(mul_lo=0.9, mul_hi=1.1, con_lo=0.8, con_hi=1.2, exp_lo=-1, exp_hi=2)
    gaussian_blur(lo=0.5, hi=1)   sigma     average_blur(lo=3, hi=lo)  odd size
    motion_blur(lo=3, hi=5)       length, any angle     median_blur(k=3)  3, 5 or 7
    jpeg(lo=60, hi=80)            quality (host only)
    gamma(lo=0.7, hi=1.3)  channel_gamma(lo=0.7, hi=1.3)
    sigmoid_contrast(lo=5, hi=8, cut_lo=0.3, cut_hi=0.6)  log_contrast(lo=0.6, hi=1)
    linear_contrast(lo=0.6, hi=1.4)   rotate(lo=-2, hi=2) degrees, edge fill
    identity
Not in the article, for small sets of pictures (neither adds a trace of the label):
    zoom(lo=0.6, hi=1)   a random square window, side lo..hi of the image, stretched back
    mirror(p=0.5)        the mirror image of the upright picture (reads labels: host only,
                         put it first)

Mapping from the article's full-resolution ranges to output pixels
------------------------------------------------------------------
The article augmented 0.3-1.2 MP photos (longest side ~640-1280 px) and then
resized to 128 with cv2.resize (bilinear, no anti-aliasing), a factor d of
~5-10. Through that resize:
  * per-pixel noise and salt/pepper/dropout survive almost unchanged (each
    output pixel is interpolated from only 2x2 source pixels), so their
    ranges are kept as stated, in output grey levels and per output pixel;
  * colour and contrast ops are resolution-free: kept as stated;
  * blur kernels shrink by d: sigma 0.5-1 and kernels 3-7 become 0.05-1.4 px,
    i.e. mostly nothing. Scaling them literally would make every blur a
    no-op; keeping them literal at 128 px would blur 5-10x more than the
    article's model ever saw (a 7x7 median at 128 px wipes out the fine
    detail an orientation cue may live in). So each blur gets the SMALLEST
    KERNEL THAT STILL ACTS at the output resolution: gaussian sigma 0.5-1
    (kept), average k 3 (from 3-5), motion length 3-5 (from 5-7), median k 3
    (from 5-7). Larger kernels stay available through the spec string.
  * the +-2 degree rotation is an angle: kept.

Placement and JPEG
------------------
JPEG encode/decode has no GPU kernel, so `split_policy(op)` returns
(host_op, device_op): host_op runs in tf.data, device_op wherever the caller
wants (tf.data for "host" placement, the AugmentLayer for "device"). host_op
then device_op is exactly the whole policy (ops keep their seeds): every step
up to the last host-only one runs on the host. So that the device gets all
the rest, the default policy puts
sometimes(0.5, jpeg(60, 80)) FIRST (the article had it after the blurs). A
second reason for that order: rotate90_random runs before the policy, so any
8x8 JPEG block grid the compression adds is anchored at the ROTATED image's
top-left corner -- the same corner for every label, hence no orientation cue
-- and the noise and blurs that follow blur it further.

Note on the source: its `sometimes = lambda aug: iaa.Sometimes(0.5)` drops
`aug`, so the article's frequency blend, JPEG and small rotation never ran.
We follow the intended sequence (design notes), with p = 0.5 for each.
"""
import ast
import copy
import inspect
import keyword
import re

import keras
import tensorflow as tf

from upright.pipeline import augment_ops
from upright.pipeline import per_image_random as rnd
from upright.pipeline.augment_ops import Identity, Op
from upright.pipeline import augment_schedule

DEFAULT_SPEC = (
    "sometimes(0.5, jpeg(60,80)); "
    "add(-15,15) | multiply(0.8,1.2) | hue_saturation(0.8,1.1); "
    "gaussian_noise(0.02,12.75,0.5) | laplace_noise(0.02,12.75,0.5) | poisson_noise(8,16,0.5); "
    "dropout(0.005) | pepper(0.005) | salt(0.01); "
    "sometimes(0.5, frequency_blend(0.9,1.1,0.8,1.2,-1,2)); "
    "gaussian_blur(0.5,1) | average_blur(3,3) | motion_blur(3,5) | median_blur(3); "
    "gamma(0.7,1.3) | channel_gamma(0.7,1.3) | sigmoid_contrast(5,8,0.3,0.6) | "
    "log_contrast(0.6,1) | linear_contrast(0.6,1.4); "
    "sometimes(0.5, rotate(-2,2))")


# ---------------------------------------------------------------- composition
#
# Composites hold ops and draw choices; augment_schedule runs them (Op.__call__
# and Op.call_static hand every op, leaf or composite, to augment_schedule.run).

class _Composite(Op):
    """An op made of ops (self.ops): each child is bound under this op's path,
    and the whole reads labels when any child does."""

    def bind(self, path):
        self.salt = rnd.salt_of(path)
        for i, op in enumerate(self.ops):
            op.bind(f"{path}/{i}.{op.name}")

    @property
    def reads_labels(self):
        return any(op.reads_labels for op in self.ops)


class Sequential(_Composite):
    """Applies its ops in order."""
    name = "sequential"
    kind = "sequence"

    def __init__(self, ops, _bind=True):
        super().__init__()
        # Copies: one op object placed twice would otherwise share its seed.
        self.ops = [copy.deepcopy(op) for op in ops] if _bind else list(ops)
        self.host = any(op.host for op in self.ops)
        if _bind:
            self.bind(self.name)

    def spec(self):
        return "; ".join(op.spec() if not isinstance(op, Sequential) else f"({op.spec()})"
                         for op in self.ops) or "none"


class OneOf(_Composite):
    """Each image picks one of `ops` (probabilities `weights`, default uniform).

    If every branch is pointwise (colour/contrast ops, additive noise), all
    branches run on every image and a per-image select picks the result, in
    one XLA kernel; sparse branches write all their hits at once; otherwise
    rows are grouped by choice and each branch runs on its own images only
    (augment_schedule.run_grouped); the order is restored at the end.
    """
    name = "one_of"
    kind = "choice"

    def __init__(self, ops, weights=None):
        super().__init__()
        self.ops = [copy.deepcopy(op) for op in ops]
        if not self.ops:
            raise ValueError("OneOf needs at least one op")
        weights = [1.0] * len(self.ops) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.ops) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"bad OneOf weights {weights}")
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.host = any(op.host for op in self.ops)
        self.bind(self.name)

    def choose(self, seeds):
        """Branch index per image, int32 [B]."""
        u = rnd.uniforms(rnd.fold_seeds(seeds, self.salt), 1)[:, 0]
        edges, acc = [], 0.0
        for w in self.weights[:-1]:
            acc += w
            edges.append(acc)
        if not edges:
            return tf.zeros_like(u, tf.int32)
        return tf.reduce_sum(tf.cast(u[:, None] >= tf.constant(edges)[None, :], tf.int32), 1)

    def spec(self):
        # A nested Sequential or OneOf has no syntax of its own inside '|':
        # sometimes(1, ...) groups it (always applied).
        return " | ".join(f"sometimes(1, {op.spec()})" if type(op) in (Sequential, OneOf)
                          else op.spec() for op in self.ops)


class Sometimes(OneOf):
    """Applies `op` to a fraction p of the images (chosen per image): a OneOf
    of op and Identity. Of a maskable or pointwise op it runs on the whole
    batch with the op masked off for the others (augment_schedule "masked")."""
    name = "sometimes"
    kind = "optional"

    def __init__(self, p, op):
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"sometimes: p={p} not in [0, 1]")
        super().__init__([op, Identity()], [p, 1.0 - p] if p < 1.0 else [1.0, 0.0])
        self.p = p

    def spec(self):
        return f"sometimes({self.p:g}, {self.ops[0].spec()})"


# ---------------------------------------------------------------- rotation labels

_ROT90_SALT = rnd.salt_of("rotate90_random")


@augment_ops.plain
def rotate90_random(images, labels, seeds):
    """Turns each image by a uniform random k in {0,1,2,3} quarter turns CCW.

    images float32 (or any dtype) [B, S, S, C] (square); labels ignored;
    seeds int32 [B, 2]. Returns (tf.image.rot90(image_b, k_b) per image,
    labels int32 [B] = k). k comes only from each image's seed.
    """
    images = tf.convert_to_tensor(images)
    if images.shape[1] is not None and images.shape[1] != images.shape[2]:
        raise ValueError(f"rotate90_random needs square images, got {images.shape}")
    k = rnd.randint(0, 3, rnd.uniforms(rnd.fold_seeds(seeds, _ROT90_SALT), 1)[:, 0])
    return _rot90_per_image(images, k), k


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _rot90_per_image(images, k):
    """tf.image.rot90(images[b], k[b]) for every b, exactly (a permutation of
    pixels). All four turns and a per-image select fuse into one XLA pass,
    about 3x cheaper on a CPU than grouping the batch by k."""
    pick = tf.reshape(k, [-1, 1, 1, 1])
    out = images
    for q in range(1, 4):
        out = tf.where(tf.equal(pick, q), tf.image.rot90(images, q), out)
    return out


# ---------------------------------------------------------------- policies

def refuse_label_readers(op: Op, where: str):
    """Raises ValueError if `op` holds an op that reads the labels (mirror):
    `where` passes none (the model-side AugmentLayer sees no labels)."""
    if op.reads_labels:
        readers = [leaf.spec() for leaf in _leaves(op) if leaf.reads_labels]
        raise ValueError(f"{', '.join(readers)} reads the labels, which {where} does not pass; "
                         f"put it first in the policy so that split_policy keeps it on the host")


def _leaves(op):
    """The leaf ops of a policy, in order."""
    if hasattr(op, "ops"):
        return [leaf for child in op.ops for leaf in _leaves(child)]
    return [op]


def split_policy(op: Op):
    """(host_op, device_op): host_op holds the ops with no GPU kernel (JPEG).

    host_op followed by device_op gives exactly op's result (each op keeps its
    seed). For a Sequential, every step up to and including the last one that
    holds a host-only op goes to the host part, the rest to the device part.
    """
    if not op.host:
        return Identity(), op
    if not isinstance(op, Sequential):
        return op, Identity()
    last = max(i for i, child in enumerate(op.ops) if child.host)
    # Device-capable ops before the last host op stay on the host: the order
    # (and so the result) is kept; put host ops first to move more to the device.
    host, device = op.ops[:last + 1], op.ops[last + 1:]
    if isinstance(op.ops[last], Sequential):
        # A nested sequence ("mirror; default"): split it too, so that its
        # steps after its own last host op still go to the device.
        inner_host, inner_device = split_policy(op.ops[last])
        host, device = op.ops[:last] + [inner_host], [inner_device] + device
    return Sequential(host, _bind=False), Sequential(device, _bind=False)


# ---------------------------------------------------------------- spec parser

def known_ops():
    """Names accepted in spec strings."""
    return sorted(set(augment_ops.OPS) | {"sometimes", "default", "none"})


# The spec characters: names, numbers, '(),=' and the two separators; '*' so
# that a starred argument gets its own message. Anything else (a '#' would
# start a Python comment) is refused before Python's parser sees it.
_SPEC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.+-*(),=;| \t\r\n")


def parse_policy(spec: str) -> Op:
    """A policy from a spec string ("default", "none" or steps; see module doc).

    The result is always a Sequential (so that split_policy and seed paths are
    uniform). Raises ValueError on syntax errors, unknown op names and
    arguments that are not numbers or not the op's.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty policy spec {spec!r}; use 'none' for no augmentation")
    op = _SpecParser(spec).parse()
    return op if isinstance(op, Sequential) else Sequential([op])


class _SpecParser:
    """A spec string as a Python expression, read with `ast`.

    Names are case-insensitive (the text is lower-cased). '|' is Python's
    bitwise or; each ';' becomes ' or ', the one operator that binds less
    tightly, so "a | b; c" reads as (a | b) or c: a sequence of a OneOf and c.
    An op is a Name or a Call with number arguments, positional or keyword
    (the op's parameter names); sometimes(p, STEPS) takes steps as its second
    argument. Nothing is evaluated: the tree is only read.
    """

    def __init__(self, spec: str):
        self.spec = spec

    def fail(self, message: str):
        raise ValueError(f"policy spec {self.spec!r}: {message}")

    def parse(self):
        text = self.spec.lower()
        bad = sorted(set(text) - _SPEC_CHARS)
        if bad:
            raise ValueError(f"unexpected character {bad[0]!r} in policy spec {self.spec!r}")
        for word in re.findall(r"[a-z_][a-z0-9_]*", text):
            if keyword.iskeyword(word):
                self.fail(f"expected an op name, got {word!r}")
        # A trailing ';' (at the end or before a ')') is tolerated.
        text = re.sub(r";(\s*(\)|$))", r"\1", text).replace(";", " or ")
        try:
            tree = ast.parse(f"({text}\n)", mode="eval")
        except SyntaxError as e:
            self.fail(f"bad syntax ({e.msg})")
        self.text = f"({text}\n)"
        return self.steps(tree.body)

    def part(self, node) -> str:
        return (ast.get_source_segment(self.text, node) or ast.unparse(node)).replace(" or ", "; ")

    def steps(self, node):
        """';'-separated steps: one op or a Sequential."""
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            return Sequential([self.alternatives(v) for v in node.values])
        return self.alternatives(node)

    def alternatives(self, node):
        """'|'-separated alternatives: one op or a OneOf."""
        branches = []

        def collect(n):
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
                collect(n.left)
                collect(n.right)
            else:
                branches.append(self.term(n))

        collect(node)
        return branches[0] if len(branches) == 1 else OneOf(branches)

    def term(self, node):
        """One op: `name` or `name(args)`; a parenthesised group of steps."""
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            return self.steps(node)
        call = node if isinstance(node, ast.Call) else None
        name_node = call.func if call else node
        if not isinstance(name_node, ast.Name):
            self.fail(f"expected an op name, got {self.part(node)!r}")
        name = name_node.id
        if name not in known_ops():
            raise ValueError(f"unknown augmentation op {name!r} in policy spec {self.spec!r}; "
                             f"known ops: {', '.join(known_ops())}")
        if name == "sometimes":
            return self.sometimes(call)
        args, kwargs = self.arguments(name, call)
        if name in ("default", "none"):
            if args or kwargs:
                self.fail(f"'{name}' takes no arguments")
            return Identity() if name == "none" else _SpecParser(DEFAULT_SPEC).parse()
        return self.make(name, args, kwargs)

    def sometimes(self, call):
        if call is None or len(call.args) != 2 or call.keywords:
            self.fail("sometimes needs (p, STEPS), e.g. sometimes(0.5, jpeg(60,80))")
        p = self.number(call.args[0])
        if p is None:
            self.fail(f"sometimes(p, steps) needs a number p, got {self.part(call.args[0])!r}")
        return Sometimes(p, self.steps(call.args[1]))

    def arguments(self, name, call):
        """(positional floats, keyword floats) of an op's call; none for a bare name."""
        if call is None:
            return [], {}
        args, kwargs = [], {}
        for node in call.args:
            value = self.number(node)
            if value is None:
                self.fail(f"arguments of {name} must be numbers, got {self.part(node)!r}")
            args.append(value)
        for kw in call.keywords:
            value = self.number(kw.value)
            if kw.arg is None or value is None:
                self.fail(f"arguments of {name} must be numbers, got {self.part(kw)!r}")
            kwargs[kw.arg] = value
        return args, kwargs

    @staticmethod
    def number(node):
        """The float of a number literal with at most one sign, else None."""
        sign = 1.0
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            node = node.operand
        if (isinstance(node, ast.Constant) and type(node.value) in (int, float)):
            return sign * float(node.value)
        return None

    def make(self, name, args, kwargs):
        cls = augment_ops.OPS[name]
        params = inspect.signature(cls).parameters
        try:
            inspect.signature(cls).bind(*args, **kwargs)
        except TypeError as e:
            self.fail(f"bad arguments for {name}: {e} (parameters: {', '.join(params) or 'none'})")
        return cls(*args, **kwargs)


# ---------------------------------------------------------------- Keras layer

@keras.saving.register_keras_serializable(package="upright")
class AugmentLayer(keras.layers.Layer):
    """The device part of a policy, in front of a model, active in training.

    call({"images": float32 [B, S, S, 3] in [0, 255], "seeds": int32 [B, 2]},
    training) -> images: the device part of `policy_spec` when training,
    the images unchanged otherwise. Feed it the dataset of
    input_fn(..., augment_on="device"), whose images already went through
    rotate90_random and the host part.

    `schedule` says how a OneOf/Sometimes runs (the values are the same):
      "static"   every branch on the whole batch, then a per-image select:
                 static shapes, so XLA compiles it with the model step; the
                 right choice on an accelerator, which has compute to spare
                 and would stall on the host for the sizes of grouped rows;
      "grouped"  the host schedule: each branch on its own images only (rows
                 grouped by choice, data-dependent shapes: no XLA);
      "auto"     "static" when traced for XLA (Keras jit_compile=True) or when
                 a GPU/TPU is visible, else "grouped" (the CPU economy).
    """

    SCHEDULES = augment_schedule.SCHEDULES

    def __init__(self, policy_spec: str = "default", schedule: str = "auto", **kwargs):
        # float32 even under a mixed-precision policy: augmenting float16
        # pixels would round them (steps of 0.125 above 128) before the ops.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {self.SCHEDULES}, got {schedule!r}")
        self.policy_spec = policy_spec
        self.schedule = schedule
        self._device_op = split_policy(parse_policy(policy_spec))[1]
        refuse_label_readers(self._device_op, "AugmentLayer (the model side)")
        # Traced for XLA, the layer takes the static schedule: Keras may compile it.
        self.supports_jit = schedule != "grouped"

    def resolved_schedule(self) -> str:
        """The schedule of the trace under way: "static" or "grouped"."""
        return augment_schedule.resolve(self.schedule)

    def call(self, inputs, training=None):
        images = tf.cast(inputs["images"], tf.float32)
        if not training:
            return images
        seeds = tf.cast(inputs["seeds"], tf.int32)
        labels = tf.zeros(tf.shape(images)[:1], tf.int32)  # pixel ops ignore them
        if self.resolved_schedule() == "static":
            return self._device_op.call_static(images, labels, seeds)[0]
        return self._device_op(images, labels, seeds)[0]

    def compute_output_shape(self, input_shape):
        return input_shape["images"]

    def get_config(self):
        return {**super().get_config(), "policy_spec": self.policy_spec,
                "schedule": self.schedule}
