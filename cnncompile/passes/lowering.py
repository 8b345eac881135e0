"""Convolution lowering: pick an algorithm for every Conv / FusedConv / ConvTranspose.

The choice is recorded, never executed here: ``node.annotations["algorithm"]`` is one of
ALGORITHMS, ``annotations["_reason"]`` says which shape facts and cost-model numbers decided it,
``annotations["_cost"]`` holds the estimated cost of each candidate (MAC-equivalents) and
``annotations["_macs"]`` the direct multiply-add count. The reference executor ignores all of it;
a backend reads ``algorithm`` (and its autotuner may overrule it).

Structural rules come first: ConvTranspose -> transposed; group == C == K -> depthwise (any
kernel); other groups -> grouped; 1x1, stride 1, unpadded -> gemm_1x1 (the conv *is* a GEMM).
Every other conv is costed, in multiply-add equivalents at GEMM speed:

* direct       MACs / DIRECT_EFFICIENCY: a loop nest without cache blocking or packing;
* im2col_gemm  MACs / gemm_efficiency + IM2COL_TRAFFIC x (elements of the column matrix): the
               copy costs memory traffic, the GEMM is slow when its reduction (C*R*S), its
               column count (K) or its positions (N * output pixels) are few, so small C*R*S
               goes direct;
* Winograd     (2-D 3x3, stride 1, dilation 1, at least WINOGRAD_MIN_CHANNELS input channels)
               tiles x K x C x (m+2)^2 multiplies / gemm_efficiency (few tiles make short
               GEMMs: a 14x14 image has 49 F(2x2) tiles but 16 F(4x4) ones) + the input and
               output transforms + the traffic of the transformed tensors. The filter transform
               is done once at compile time and costs nothing here. F(4x4,3x3) is a candidate
               only for outputs of at least F4_MIN_OUTPUT per side (smaller ones waste most of a
               4x4 tile) with C and K of at least F4_MIN_CHANNELS (so its larger transforms are
               amortised over enough channel pairs: with 16, U-Net's 256x256 layers ran 1.5x
               faster in F(4x4) than F(2x2); and its 5-7x larger float32 error, see
               ops/winograd.py, buys a real speed-up).

Every candidate also pays for reading its weights (W; Winograd's transformed W is (m+2)^2 / 9
times larger) when the model's weights are larger than WEIGHT_CACHE_BYTES, so that they come from
memory on every run: then at batch 1 a few tiles per weight make Winograd lose to im2col.

The cheapest candidate wins. The constants are rough and deliberately few; the point is a choice
that is explained, not a tuned one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..ir.graph import Graph, Node
from ..ops.winograd import TILE_SIZES, transform_ops
from .manager import note, register_pass

ALGORITHMS = ("direct", "im2col_gemm", "gemm_1x1", "winograd_f2x2_3x3", "winograd_f4x4_3x3",
              "depthwise", "grouped", "transposed")
CONV_OPS = ("Conv", "FusedConv", "ConvTranspose")

#: a GEMM reaches full speed from this reduction length on...
GEMM_FULL_REDUCTION = 16
#: ...with this many output columns sharing each loaded input...
GEMM_FULL_COLUMNS = 8
#: ...and this many positions (or Winograd tiles) per GEMM: single-threaded, the 256x256 F(4x4)
#: GEMMs of a 14x14 image (16 tiles) took 47 ns per thousand multiplies, F(2x2)'s (49 tiles) 30,
#: im2col's (196 positions) 22; F(4x4) on 7x7 (4 tiles) 148
GEMM_FULL_POSITIONS = 24
#: speed of a direct loop nest relative to a GEMM at full speed
DIRECT_EFFICIENCY = 0.5
#: cost of one element written to a scratch buffer and read back, in MAC-equivalents
IM2COL_TRAFFIC = 2.0
#: cost of one weight element read from memory per call, in MAC-equivalents, charged when the
#: model's weights exceed WEIGHT_CACHE_BYTES (then every run streams them from memory): at batch
#: 1, ResNet-18's 512-channel 7x7 layers ran 2.0-2.2 ms in F(2x2) (16.8 MB of transformed
#: weights) and the model 15.4 ms instead of 17.6 with im2col (9.4 MB)
WEIGHT_TRAFFIC = 20.0
WEIGHT_CACHE_BYTES = 16 << 20
WINOGRAD_MIN_CHANNELS = 8
F4_MIN_OUTPUT = 8
F4_MIN_CHANNELS = 16


def winograd_name(m: int) -> str:
    return f"winograd_f{m}x{m}_3x3"


@dataclass(frozen=True)
class ConvProblem:
    """The shape facts of one convolution node."""
    op: str
    batch: int
    channels: int
    out_channels: int
    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    #: the model's weights do not stay in cache from run to run (WEIGHT_CACHE_BYTES)
    streamed: bool = False

    @classmethod
    def of(cls, node: Node, streamed: bool = False) -> "ConvProblem":
        x, w, y = node.inputs[0].type, node.inputs[1].type, node.outputs[0].type
        rank = x.rank - 2
        # a symbolic batch is costed per image
        batch = x.shape[0] if isinstance(x.shape[0], int) else 1
        attrs = node.attrs
        return cls(node.op, batch, x.shape[1], y.shape[1], attrs.get("group", 1),
                   tuple(w.shape[2:]), tuple(attrs.get("strides") or [1] * rank),
                   tuple(attrs.get("dilations") or [1] * rank),
                   tuple(attrs.get("pads") or [0] * (2 * rank)), tuple(x.shape[2:]),
                   tuple(y.shape[2:]), streamed)

    @property
    def macs(self) -> int:
        """Multiply-adds of the direct algorithm (Conv.flops / 2)."""
        if self.op == "ConvTranspose":
            return (self.batch * math.prod(self.in_spatial) * self.channels
                    * (self.out_channels // self.group) * math.prod(self.kernel))
        return (self.batch * self.out_channels * math.prod(self.out_spatial)
                * (self.channels // self.group) * math.prod(self.kernel))

    @property
    def reduction(self) -> int:
        return self.channels // self.group * math.prod(self.kernel)

    def weight_cost(self, weights: int) -> float:
        """MAC-equivalents of reading ``weights`` elements from memory (0 when they stay in
        cache)."""
        return WEIGHT_TRAFFIC * weights if self.streamed else 0.0

    def winograd_valid(self) -> bool:
        return (self.op != "ConvTranspose" and self.group == 1 and self.kernel == (3, 3)
                and self.strides == (1, 1) and self.dilations == (1, 1))

    def facts(self) -> str:
        text = (f"{dims(self.kernel)} {self.op} stride {dims(self.strides)}, "
                f"{self.channels}->{self.out_channels} channels, "
                f"{dims(self.in_spatial)}->{dims(self.out_spatial)}")
        if set(self.dilations) != {1}:
            text += f", dilation {dims(self.dilations)}"
        if self.group != 1:
            text += f", group {self.group}"
        if self.batch != 1:
            text += f", batch {self.batch}"
        return text


def dims(values) -> str:
    return "x".join(str(v) for v in values)


def count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= limit:
            return f"{n / limit:.3g}{suffix}"
    return f"{n:.3g}"


def gemm_efficiency(reduction: int, columns: int, positions: int) -> float:
    return (min(1.0, reduction / GEMM_FULL_REDUCTION) * min(1.0, columns / GEMM_FULL_COLUMNS)
            * min(1.0, positions / GEMM_FULL_POSITIONS))


@dataclass(frozen=True)
class Candidate:
    algorithm: str
    cost: float
    detail: str


def direct_candidate(p: ConvProblem) -> Candidate:
    cost = p.macs / DIRECT_EFFICIENCY + p.weight_cost(p.out_channels * p.reduction)
    return Candidate("direct", cost,
                     f"direct {count(p.macs)} MACs at {DIRECT_EFFICIENCY:g} speed")


def im2col_candidate(p: ConvProblem) -> Candidate:
    columns = p.batch * math.prod(p.out_spatial) * p.reduction
    efficiency = gemm_efficiency(p.reduction, p.out_channels // p.group,
                                 p.batch * math.prod(p.out_spatial))
    cost = (p.macs / efficiency + IM2COL_TRAFFIC * columns
            + p.weight_cost(p.out_channels * p.reduction))
    return Candidate("im2col_gemm", cost,
                     f"im2col {count(p.macs)} MACs at {efficiency:.2g} speed + "
                     f"{count(columns)} copied")


def winograd_candidate(p: ConvProblem, m: int) -> Candidate:
    alpha = m + 2
    tiles = p.batch * math.prod(-(-o // m) for o in p.out_spatial)
    multiplies = tiles * p.out_channels * p.channels * alpha ** 2
    input_ops, output_ops = transform_ops(m, len(p.kernel))
    transforms = tiles * (p.channels * input_ops + p.out_channels * output_ops)
    traffic = IM2COL_TRAFFIC * tiles * alpha ** 2 * (p.channels + p.out_channels)
    efficiency = gemm_efficiency(p.channels, p.out_channels, tiles)
    weights = p.out_channels * p.channels * alpha ** 2  # transformed: (m + 2)^2 / 9 times W
    cost = multiplies / efficiency + transforms + traffic + p.weight_cost(weights)
    return Candidate(winograd_name(m), cost,
                     f"F({m}x{m},3x3) {count(multiplies)} multiplies "
                     f"({p.macs / multiplies:.2f}x fewer) + {count(transforms)} transform ops")


def winograd_tiles(p: ConvProblem) -> tuple[list[int], str]:
    """Tile sizes worth costing, and why Winograd is out or limited (for the reason)."""
    if not p.winograd_valid():
        return [], ""
    if p.channels < WINOGRAD_MIN_CHANNELS:
        return [], (f"Winograd skipped: {p.channels} input channels < {WINOGRAD_MIN_CHANNELS} "
                    "cannot amortise its transforms")
    tiles = [m for m in TILE_SIZES if m == 2 or (min(p.out_spatial) >= F4_MIN_OUTPUT and min(
        p.channels, p.out_channels) >= F4_MIN_CHANNELS)]
    why = ""
    if 4 not in tiles:
        why = (f"F(4x4) needs outputs >= {F4_MIN_OUTPUT} per side and >= {F4_MIN_CHANNELS} "
               "channels")
    return tiles, why


def choose(p: ConvProblem) -> tuple[str, str, dict[str, float]]:
    """(algorithm, reason, {candidate: cost})."""
    macs = count(p.macs)
    if p.op == "ConvTranspose":
        reason = (f"{p.facts()}: transposed, a [{p.channels} -> "
                  f"{p.out_channels // p.group}x{dims(p.kernel)}] GEMM per input position and a "
                  f"col2im scatter-add; {macs} MACs")
        return "transposed", reason, {"transposed": float(p.macs)}
    if p.group > 1:
        if p.group == p.channels == p.out_channels:
            reason = (f"{p.facts()}: depthwise, one {dims(p.kernel)} filter per channel and no "
                      f"channel reduction to make a GEMM of; {macs} MACs")
            return "depthwise", reason, {"depthwise": float(p.macs)}
        reason = (f"{p.facts()}: grouped, {p.group} GEMMs of {p.channels // p.group}->"
                  f"{p.out_channels // p.group} channels; {macs} MACs")
        return "grouped", reason, {"grouped": float(p.macs)}
    if set(p.kernel) == {1} and set(p.strides) == {1} and not any(p.pads):
        reason = (f"{p.facts()}: gemm_1x1, the conv is a [{p.batch * math.prod(p.out_spatial)} x "
                  f"{p.channels}] by [{p.channels} x {p.out_channels}] GEMM with no im2col copy; "
                  f"{macs} MACs")
        return "gemm_1x1", reason, {"gemm_1x1": float(p.macs)}
    candidates = [direct_candidate(p), im2col_candidate(p)]
    tiles, limit = winograd_tiles(p)
    candidates += [winograd_candidate(p, m) for m in tiles]
    best = min(candidates, key=lambda c: c.cost)
    ranked = sorted(candidates, key=lambda c: c.cost)
    costs = ", ".join(f"{c.algorithm} {count(c.cost)}" for c in ranked)
    details = "; ".join(c.detail for c in candidates)
    reason = f"{p.facts()}: {details}"
    if p.streamed:
        reason += (f"; weights read from memory every run (the model's exceed "
                   f"{WEIGHT_CACHE_BYTES >> 20} MiB): {WEIGHT_TRAFFIC:g} per element")
    if limit:
        reason += f"; {limit}"
    reason += f"; estimated cost (MAC-equivalents) {costs}: {best.algorithm} is cheapest"
    return best.algorithm, reason, {c.algorithm: float(c.cost) for c in candidates}


@register_pass("lower_convolutions",
               "annotate every convolution with its algorithm (direct, im2col, 1x1 GEMM, "
               "Winograd, depthwise, grouped, transposed) chosen by a cost model, and why")
def lower_convolutions(graph: Graph) -> Graph:
    tally: dict[str, int] = {}
    streamed = sum(v.data.nbytes for v in graph.constants.values()) > WEIGHT_CACHE_BYTES
    for node in graph.nodes:
        if node.op not in CONV_OPS:
            continue
        problem = ConvProblem.of(node, streamed)
        algorithm, reason, costs = choose(problem)
        node.annotations["algorithm"] = algorithm
        node.annotations["_reason"] = reason
        node.annotations["_cost"] = costs
        node.annotations["_macs"] = problem.macs
        tally[algorithm] = tally.get(algorithm, 0) + 1
    if tally:
        ranked = sorted(tally.items(), key=lambda item: (-item[1], item[0]))
        note("conv algorithms: " + ", ".join(f"{n} {name}" for name, n in ranked))
    return graph
