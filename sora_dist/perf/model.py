"""Performance model of one training step of the video DiT on a layout: time, memory, MFU.

Everything is per device (rank) and per optimizer step, for a global batch split evenly over the
data-parallel ranks (no gradient accumulation). The terms, and what they assume:

Compute.  The FLOPs a rank runs are ``sora_dist.models.executed_train_flops`` for its samples:
  SP divides the tokens' work but not the patch embedding (before the split) nor the text's and
  timestep's (every SP rank conditions on the whole sample); TP divides the layers of its plan;
  layers fed by data compute no input gradient; activation checkpointing adds one forward of
  every recomputed block. MFU counts model FLOPs (``train_flops``, 3x the forward matmuls)
  divided evenly over SP and TP. Time is FLOPs over the achieved rate (peak x compute efficiency, or
  measured by ``calibrate``), plus the optimizer and EMA update, which is memory bound (44 bytes
  per local parameter: AdamW reads p, g, m, v and writes p, m, v; the EMA reads p and updates its
  copy; clipping reads g), plus a fixed per-step overhead (calibrated; 0 otherwise).
Communication, each collective timed as latency + size x nccl-tests bus factor / bus bandwidth of
  the group's links (inside a node or across nodes; or the bench-comm calibration):
  - FSDP (over dp_shard x sp): all-gather of the bf16 parameters in forward, again in backward when
    ``reshard_after_forward``, reduce-scatter of fp32 gradients; one collective per block, plus
    FSDP2's copies (shard in and block out per all-gather, the gradients' concatenation per
    reduce-scatter) at the bandwidth of writes to new memory (calibrated; HBM otherwise). HSDP
    adds an all-reduce of the gradient shards over dp_replicate. With ``overlap`` (a device with
    streams) they run behind compute, prefetched a block ahead: only what exceeds the compute time
    is exposed, plus the first block's all-gather and the last block's reduce-scatter.
  - DDP: all-reduce of fp32 gradients over dp x sp in 25 MiB buckets, exposed like FSDP's.
  - Ulysses: four all-to-alls per self-attention forward (q, k, v in, output back) and four in
    backward; never overlapped (the attention waits for them).
  - Ring: sp_ring - 1 send/recv steps of the K/V block per self-attention forward and twice that
    in backward (K/V, and their gradients), behind that attention's compute when ``overlap``.
  - TP: all-reduce of the (tokens x hidden) activations after the three row-parallel layers in
    forward, and of the inputs' gradients of the five column-parallel layers fed by the tokens in
    backward; of (text x hidden) for the two fed by the text; of the four QK-norm weights'
    gradients; as DTensor issues them (functional, out of place: bench-comm's
    all_reduce_functional); never overlapped.
  Recomputed blocks repeat their forward communication.
Host work of the wrappers.  FSDP2's hooks and DTensor's dispatch under the TP plan cost host time
  per block and step (measured by ``calibrate`` on one rank; 0 otherwise), slowed like compute
  where ranks share cores. A device with streams runs ahead of the host, so there only what
  exceeds the compute is exposed; on cpu the host is the device and all of it is.
Rank skew.  Every blocking collective waits for the last rank to arrive. bench-comm measures the
  delay that costs the step after bursts of compute of several lengths (OS noise, ranks late in
  turn, ranks sharing cores): the bursts with a collective after each, against the same bursts
  with none between them on the slowest rank; not the mean wait, since where ranks share cores a
  waiting rank's core goes to the ranks still computing. The model splits a rank's compute and
  host work evenly between its blocking collectives (every collective above but DDP's buckets,
  which complete behind the backward, plus one at the end of the step) and adds, at each, the
  delay interpolated at that burst length (0 without a measurement).
Memory.  Parameters, gradients (fp32), AdamW moments (2 x fp32) and the EMA (fp32) are exact: the
  parameter shapes of the real module (built on the meta device), split by the real TP plan and
  chunked over FSDP's dimension 0 as FSDP2 does. Activations come from saved-tensor accounting of
  the block (tests/perf/test_model.py measures it): 12 hidden-wide tensors per token that TP
  keeps whole, 11 that TP splits and 2 MLP-wide ones; full checkpointing keeps one hidden-wide
  tensor per block, plus one block's activations during its recompute. Buffers: FSDP's gathered
  parameters and unsharded gradients of the blocks in flight (all blocks' parameters without
  resharding), DDP's gradient buckets. A layout fits when the total is within 90% of memory.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from sora_dist.config import ParallelConfig
from sora_dist.errors import ConfigError
from sora_dist.models import DiTConfig, VideoDiT, context_len, executed_train_flops, train_flops
from sora_dist.parallel.mesh import MESH_DIMS, ParallelDims, resolve_dims
from sora_dist.parallel.tensor import TP_PLAN
from sora_dist.perf.bench_comm import bus_factor
from sora_dist.perf.hardware import Accelerator

OPTIMIZER_BYTES_PER_PARAM = 44
DDP_BUCKET_BYTES = 25 * 1024**2
# Saved activations per token of one block, in hidden-size units (see the module docstring).
ACT_WHOLE, ACT_SPLIT, ACT_MLP = 12, 11, 2
ACT_OUTSIDE_BLOCKS = 4  # embeddings, final layer, loss: hidden-wide tensors per token
MEMORY_HEADROOM = 0.9
AC_POLICIES = ("none", "selective", "full")


@dataclass(frozen=True)
class Workload:
    model: DiTConfig
    latent: tuple[int, int, int]
    text_len: int
    global_batch: int
    param_bytes: int = 2
    """Bytes per element of the gathered parameters (bf16 on GPU/NPU, fp32 on cpu)."""
    act_bytes: int = 2
    """Bytes per activation element (bf16 autocast on GPU/NPU, fp32 on cpu)."""
    ema: bool = True

    @property
    def tokens(self) -> int:
        return self.model.num_tokens(self.latent)


@dataclass(frozen=True)
class Layout:
    dims: ParallelDims
    ac: str = "none"
    ac_every: int = 2
    reshard: bool = True

    def overrides(self) -> list[str]:
        """The ``--parallel.*`` arguments that give this layout to the trainer and bench-train."""
        args = [f"--parallel.{name}={getattr(self.dims, name)}" for name in MESH_DIMS if getattr(self.dims, name) > 1 and name != "dp_shard"]
        if self.dims.engine != "fsdp":
            args.append(f"--parallel.engine={self.dims.engine}")
        if self.ac != "none":
            args.append(f"--parallel.activation_checkpointing={self.ac}")
        if self.dims.engine == "fsdp" and not self.reshard:
            args.append("--parallel.reshard_after_forward=false")
        return args

    def describe(self) -> str:
        parts = [f"{name}={getattr(self.dims, name)}" for name in MESH_DIMS if getattr(self.dims, name) > 1] or ["single device"]
        extra = [self.dims.engine if self.dims.world_size > 1 else ""]
        extra += [f"AC {self.ac}" if self.ac != "none" else "", "no reshard" if self.dims.engine == "fsdp" and not self.reshard and self.dims.world_size > 1 else ""]
        return " x ".join(parts) + "".join(f", {e}" for e in extra if e)


@dataclass
class Calibration:
    """What measurements replace in the defaults: the achieved FLOP/s of one device on this model,
    its fixed per-step overhead, its memory bandwidth, and the collectives' latency and bandwidth
    per (operation, group size, across nodes)."""

    flops_rate: Optional[float] = None
    step_overhead_s: float = 0.0
    memory_bw: Optional[float] = None
    fresh_write_bw: Optional[float] = None
    """Bytes/s of writes into newly allocated memory (collectives' outputs, FSDP's copies)."""
    shared_cores: int = 0
    """Cores that all ranks of a host share (cpu); 0 for a device per rank."""
    comm: dict[tuple[str, int, bool, int], tuple[float, float]] = field(default_factory=dict)
    """(op, group size, spans nodes, world size measured at) -> (latency s, bus bandwidth bytes/s)."""
    wrapper_host_s: dict[str, float] = field(default_factory=dict)
    """Host seconds per block and step that each wrapper adds ("tp", "fsdp"), measured on one rank."""
    skew: dict[int, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    """World size -> (burst seconds, seconds a blocking collective after it delays the step), by burst."""

    def skew_after(self, world: int, burst_s: float) -> float:
        """Seconds a blocking collective delays the step, waiting for the last rank, after ``burst_s``
        of compute, at this world size (else the nearest measured): linear between the measured
        bursts and from (0, 0), in proportion beyond the longest; 0 for one rank or without one."""
        if world == 1 or not self.skew:
            return 0.0
        curve = ((0.0, 0.0), *self.skew[min(self.skew, key=lambda w: (abs(w - world), w))])
        if burst_s >= curve[-1][0]:
            return curve[-1][1] * burst_s / curve[-1][0] if curve[-1][0] else 0.0
        for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
            if burst_s <= x1:
                return y0 + (y1 - y0) * (burst_s - x0) / (x1 - x0)
        return 0.0

    def link(self, op: str, n: int, across: bool, world: int) -> Optional[tuple[float, float]]:
        """The measurement at this world size, else the one at the nearest world size."""
        found = {w: v for (o, size, a, w), v in self.comm.items() if (o, size, a) == (op, n, across)}
        return found[min(found, key=lambda w: (abs(w - world), w))] if found else None


@dataclass
class Prediction:
    layout: Layout
    compute_s: float
    optimizer_s: float
    comm_s: dict[str, float]
    """Exposed communication per mesh group: fsdp, hsdp, ddp, sp_ulysses, sp_ring, tp."""
    host_s: float
    """Exposed host work of the wrappers (FSDP2's hooks, DTensor's dispatch)."""
    skew_s: float
    """Waiting for the last rank at blocking collectives."""
    memory: dict[str, float]
    fits: bool
    step_s: float
    mfu: float
    tokens_per_s_per_device: float


# ---------------------------------------------------------------------------------------------
# Layouts


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(model: DiTConfig, devices: int, devices_per_node: int, global_batch: int,
                      engines=("fsdp", "ddp"), ac_policies=AC_POLICIES) -> list[Layout]:
    """Every layout the trainer accepts (its own validation, ``resolve_dims``) whose data-parallel
    degree divides the global batch, with TP and Ulysses inside a node, for each AC policy and
    reshard option."""
    layouts = []
    for tp in divisors(devices):
        for ulysses in divisors(devices // tp):
            if tp * ulysses > devices_per_node:
                continue
            for ring in divisors(devices // (tp * ulysses)):
                rest = devices // (tp * ulysses * ring)
                for replicate in divisors(rest):
                    for engine in engines:
                        dims = _valid_dims(model, devices, replicate, rest // replicate, ring, ulysses, tp, engine)
                        if dims is None or global_batch % dims.dp:
                            continue
                        reshards = (True, False) if engine == "fsdp" and devices > 1 else (True,)
                        layouts += [Layout(dims, ac, reshard=r) for ac in ac_policies for r in reshards]
    return layouts


def _valid_dims(model, devices, replicate, shard, ring, ulysses, tp, engine) -> Optional[ParallelDims]:
    if engine == "ddp" and replicate > 1:
        return None  # DDP replicates everything: dp_replicate adds nothing over dp_shard
    if engine == "fsdp" and replicate > 1 and shard * ring * ulysses == 1:
        return None  # HSDP with nothing to shard is DDP
    cfg = ParallelConfig(dp_replicate=replicate, dp_shard=shard, sp_ring=ring, sp_ulysses=ulysses, tp=tp, engine=engine)
    try:
        return resolve_dims(cfg, devices, model)
    except ConfigError:  # the trainer's own rules reject it
        return None


# ---------------------------------------------------------------------------------------------
# Memory: exact parameter bytes


@functools.lru_cache(maxsize=32)
def parameter_shapes(model: DiTConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Names and shapes of the real module's parameters, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = VideoDiT(model)
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def _tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """Shape of a parameter on one TP rank under the real plan (Colwise: dim 0 of weight and bias,
    Rowwise: dim 1 of the weight)."""
    module, _, leaf = name.rpartition(".")
    for pattern, style in TP_PLAN.items():
        if tp > 1 and fnmatch.fnmatchcase(module, pattern):
            kind = type(style).__name__
            if kind == "ColwiseParallel":
                return (shape[0] // tp, *shape[1:])
            if kind == "RowwiseParallel" and leaf == "weight":
                return (shape[0], shape[1] // tp)
    return shape


def _chunk_rows(rows: int, shards: int, index: int) -> int:
    """Rows of shard ``index`` when dim 0 is cut like torch.chunk (FSDP2's sharding)."""
    size = -(-rows // shards)
    return max(0, min(size, rows - index * size))


def sharded_dims(dims: ParallelDims) -> int:
    """FSDP's shard degree (dp_shard x sp); 1 for DDP and a single device."""
    return dims.dp_shard * dims.sp if dims.engine == "fsdp" and dims.world_size > 1 else 1


def parameter_count_per_rank(model: DiTConfig, dims: ParallelDims, rank: int = 0) -> int:
    """Parameters held by ``rank`` (mesh order dp_replicate, dp_shard, sp_ring, sp_ulysses, tp)."""
    shards = sharded_dims(dims)
    return _local_parameter_count(model, dims.tp, shards, (rank // dims.tp) % shards)


@functools.lru_cache(maxsize=4096)
def _local_parameter_count(model: DiTConfig, tp: int, shards: int, shard_index: int) -> int:
    total = 0
    for name, shape in parameter_shapes(model):
        local = _tp_local_shape(name, shape, tp)
        total += _chunk_rows(local[0], shards, shard_index) * math.prod(local[1:])
    return total


@functools.lru_cache(maxsize=256)
def tp_local_parameter_count(model: DiTConfig, tp: int, blocks_only: bool = False) -> int:
    return sum(math.prod(_tp_local_shape(n, s, tp)) for n, s in parameter_shapes(model) if not blocks_only or n.startswith("blocks."))


def state_bytes_per_rank(model: DiTConfig, dims: ParallelDims, rank: int = 0, ema: bool = True) -> dict[str, int]:
    """Exact bytes of parameters, gradients, AdamW moments and EMA on ``rank`` (all fp32)."""
    params = 4 * parameter_count_per_rank(model, dims, rank)
    return {"parameters": params, "gradients": params, "optimizer": 2 * params, "ema": params if ema else 0}


# ---------------------------------------------------------------------------------------------
# Memory: activations and buffers


def checkpointed_blocks(depth: int, ac: str, every: int) -> int:
    """How many blocks ``apply_activation_checkpointing`` wraps."""
    return {"none": 0, "full": depth, "selective": len(range(0, depth, every))}[ac]


def activation_bytes(work: Workload, layout: Layout, recompute: bool = True) -> float:
    """Activations of one rank: those saved by the forward pass, plus (``recompute``) one block's
    recomputed activations during backward under checkpointing (see the module docstring)."""
    m, dims = work.model, layout.dims
    b = work.global_batch // dims.dp
    tokens = b * -(-work.tokens // dims.sp)
    d, mlp = m.hidden_size, m.mlp_hidden
    block = tokens * (ACT_WHOLE * d + (ACT_SPLIT * d + ACT_MLP * mlp) / dims.tp)
    wrapped = checkpointed_blocks(m.depth, layout.ac, layout.ac_every)
    kept = (m.depth - wrapped) * block + wrapped * tokens * d + (block if wrapped and recompute else 0)
    return work.act_bytes * (kept + ACT_OUTSIDE_BLOCKS * tokens * d)


def buffer_bytes(work: Workload, layout: Layout) -> float:
    """Communication buffers: FSDP's gathered parameters and unsharded gradients, DDP's buckets."""
    dims = layout.dims
    if dims.world_size == 1:
        return 0.0
    if dims.engine == "ddp":
        return 4.0 * tp_local_parameter_count(work.model, dims.tp)
    per_block = tp_local_parameter_count(work.model, dims.tp, blocks_only=True) / work.model.depth
    gathered = 2 * per_block if layout.reshard else tp_local_parameter_count(work.model, dims.tp)
    return work.param_bytes * gathered + 4.0 * 2 * per_block


def memory_per_device(work: Workload, layout: Layout) -> dict[str, float]:
    memory = {k: float(v) for k, v in state_bytes_per_rank(work.model, layout.dims, 0, work.ema).items()}
    memory["activations"] = activation_bytes(work, layout)
    memory["buffers"] = buffer_bytes(work, layout)
    memory["total"] = sum(memory.values())
    return memory


# ---------------------------------------------------------------------------------------------
# Time


def group_spans_nodes(degrees: dict[str, int], names: tuple[str, ...], devices_per_node: int) -> bool:
    """Whether the groups of the mesh dimensions ``names`` (adjacent, outermost first) spread over
    nodes: their extent in the mesh (size x stride, the dimensions inside them) exceeds a node."""
    inner = MESH_DIMS[MESH_DIMS.index(names[-1]) + 1:]
    return math.prod(degrees[n] for n in names) * math.prod(degrees[n] for n in inner) > devices_per_node


class Links:
    """Collective times on the mesh groups of one layout: calibrated where measured, else the
    accelerator's link figures."""

    def __init__(self, acc: Accelerator, dims: ParallelDims, devices_per_node: int, calibration: Calibration, sharing: float = 1.0):
        self.acc, self.dims, self.per_node, self.cal, self.sharing = acc, dims, devices_per_node, calibration, sharing
        self.blocking_calls = 0.0
        """Collectives timed so far that a rank waits for (where the rank skew is paid)."""

    def copy(self, nbytes: float) -> float:
        """Seconds to write ``nbytes`` into newly allocated memory (calibrated; the HBM bandwidth
        otherwise, where a caching allocator hands back warm blocks)."""
        return nbytes * self.sharing / (self.cal.fresh_write_bw or self.acc.memory_bw)

    def spans_nodes(self, group: str) -> bool:
        names = {"fsdp": ("dp_shard", "sp_ring", "sp_ulysses"), "ddp": ("dp_replicate", "dp_shard", "sp_ring", "sp_ulysses")}.get(group, (group,))
        return group_spans_nodes(dict(zip(MESH_DIMS, self.dims.degrees)), names, self.per_node)

    def time(self, op: str, group: str, size: float, n: int, count: float = 1.0, calls: float = 1.0, blocking: bool = True) -> float:
        """``count`` times an ``op`` of ``size`` bytes over ``n`` ranks, issued as ``calls`` collectives
        (``blocking``: each one a point where the ranks wait for each other)."""
        if n <= 1 or count == 0:
            return 0.0
        self.blocking_calls += calls if blocking else 0
        across = self.spans_nodes(group)
        latency, busbw = self.cal.link(op, n, across, self.dims.world_size) or self._default(across)
        return count * (size * bus_factor(op, n) / busbw) + calls * latency

    def _default(self, across: bool) -> tuple[float, float]:
        if across:
            return self.acc.inter_latency, self.acc.inter_bw * self.acc.link_efficiency
        return self.acc.intra_latency, self.acc.intra_bw * self.acc.link_efficiency


def communication(work: Workload, layout: Layout, links: Links, compute_s: float, attention_s: float) -> dict[str, float]:
    """Exposed seconds per group (see the module docstring for the overlap rules)."""
    m, dims, overlap = work.model, layout.dims, links.acc.overlap
    b = work.global_batch // dims.dp
    local_tokens = b * -(-work.tokens // dims.sp)
    recompute = checkpointed_blocks(m.depth, layout.ac, layout.ac_every) / m.depth
    params = tp_local_parameter_count(m, dims.tp)
    comm = {}
    shards = sharded_dims(dims)
    if shards > 1:
        gathers = 2 if layout.reshard else 1
        calls = m.depth + 1
        ag = links.time("all_gather", "fsdp", params * work.param_bytes, shards, gathers, gathers * calls)
        rs = links.time("reduce_scatter", "fsdp", params * 4.0, shards, 1, calls)
        # FSDP2's copies: each all-gather copies the shard in and the gathered block out to the
        # parameters; each reduce-scatter first concatenates the block's gradients.
        copies = links.copy(fsdp_copy_bytes(params, work.param_bytes, gathers, shards))
        total = ag + rs + copies
        comm["fsdp"] = _exposed(total, compute_s, overlap, (ag / gathers + rs) / calls)
        if dims.dp_replicate > 1:
            ar = links.time("all_reduce", "dp_replicate", params * 4.0 / shards, dims.dp_replicate, 1, calls)
            comm["hsdp"] = _exposed(ar, max(0.0, compute_s - total), overlap, ar / calls)
    if dims.engine == "ddp" and dims.world_size > 1:
        size = params * 4.0
        ar = links.time("all_reduce", "ddp", size, dims.dp * dims.sp, 1, math.ceil(size / DDP_BUCKET_BYTES), blocking=False)
        comm["ddp"] = _exposed(ar, compute_s, overlap, ar / math.ceil(size / DDP_BUCKET_BYTES))
    width = m.hidden_size / dims.tp
    if dims.sp_ulysses > 1:
        size = local_tokens * width * work.act_bytes
        count = m.depth * 4 * (2 + recompute)
        comm["sp_ulysses"] = links.time("all_to_all", "sp_ulysses", size, dims.sp_ulysses, count, count)
    if dims.sp_ring > 1:
        kv = 2 * local_tokens * width * work.act_bytes  # after Ulysses: U x the tokens, 1/U of the heads
        count = m.depth * (dims.sp_ring - 1) * (3 + recompute)
        ring = links.time("send_recv", "sp_ring", kv, dims.sp_ring, count, count)
        comm["sp_ring"] = max(0.0, ring - attention_s) if overlap else ring
    if dims.tp > 1:
        # Per block, all-reduces of (tokens x hidden): the 3 row-parallel outputs in forward (again
        # when recomputed), the input gradients of the 5 column-parallel layers fed by the tokens
        # in backward; of (text x hidden): the 2 fed by the text; and the 4 QK-norm weights'
        # gradients. Timed as DTensor issues them (bench-comm's all_reduce_functional on tp).
        size = local_tokens * m.hidden_size * work.act_bytes
        text = b * context_len(m, work.text_len) * m.hidden_size * work.act_bytes
        big = m.depth * (3 * (1 + recompute) + 5)
        op = "all_reduce_functional"
        comm["tp"] = (links.time(op, "tp", size, dims.tp, big, big) + links.time(op, "tp", text, dims.tp, 2 * m.depth, 2 * m.depth)
                      + links.time(op, "tp", 4 * m.head_dim, dims.tp, 4 * m.depth, 4 * m.depth))
    return comm


def fsdp_copy_bytes(params: float, param_bytes: int, gathers: int, shards: int) -> float:
    """Bytes FSDP2 copies per step: each all-gather copies the shard in and the gathered block out to
    the parameters; each reduce-scatter first concatenates the block's fp32 gradients."""
    return gathers * params * param_bytes * (1 + 1 / shards) + params * 4.0


def wrapper_host_work(work: Workload, layout: Layout, cal: Calibration) -> float:
    """Host seconds per step of the wrappers this layout uses, before core sharing."""
    dims = layout.dims
    per_block = (cal.wrapper_host_s.get("fsdp", 0.0) if sharded_dims(dims) > 1 else 0.0) + (cal.wrapper_host_s.get("tp", 0.0) if dims.tp > 1 else 0.0)
    return per_block * work.model.depth


def _exposed(total: float, hidden_behind: float, overlap: bool, unhidden: float) -> float:
    """Communication left after hiding it behind ``hidden_behind`` seconds of compute."""
    if not overlap:
        return total
    return max(0.0, total - hidden_behind) + min(total, unhidden)


def compute_flops(work: Workload, layout: Layout) -> tuple[float, float]:
    """(FLOPs this rank executes per step, model FLOPs per rank that MFU counts)."""
    m, dims = work.model, layout.dims
    b = work.global_batch // dims.dp
    tokens = dims.sp * -(-work.tokens // dims.sp)  # padded to the SP degree
    latent = _latent_with_tokens(work, tokens)
    model_flops = b * train_flops(m, latent, work.text_len) / (dims.sp * dims.tp)
    recomputed = checkpointed_blocks(m.depth, layout.ac, layout.ac_every)
    executed = b * executed_train_flops(m, latent, work.text_len, dims.sp, dims.tp, recomputed)
    return executed, model_flops


def _latent_with_tokens(work: Workload, tokens: int) -> tuple[int, int, int]:
    """A latent shape with ``tokens`` patches (padding adds frames' worth of tokens to the last axis)."""
    if tokens == work.tokens:
        return work.latent
    t, h, w = work.model.grid(work.latent)
    p_t, p_h, p_w = work.model.patch_size
    return (t * p_t, h * p_h, (-(-tokens // (t * h))) * p_w)


def attention_flops(work: Workload, layout: Layout) -> float:
    """Self-attention score and value FLOPs of one rank per step (what the ring hides behind)."""
    dims, m = layout.dims, work.model
    b = work.global_batch // dims.dp
    return 3 * b * m.depth * 4 * work.tokens ** 2 * m.hidden_size / (dims.sp * dims.tp)


def predict(work: Workload, layout: Layout, acc: Accelerator, devices_per_node: int, calibration: Optional[Calibration] = None) -> Prediction:
    cal = calibration or Calibration()
    dims = layout.dims
    per_node = min(devices_per_node, dims.world_size)
    sharing = max(1.0, per_node / cal.shared_cores) if cal.shared_cores else 1.0
    rate = (cal.flops_rate or acc.peak_flops * acc.compute_efficiency) / sharing
    memory_bw = (cal.memory_bw or acc.memory_bw) / sharing
    executed, model_flops = compute_flops(work, layout)
    compute_s = executed / rate
    optimizer_s = OPTIMIZER_BYTES_PER_PARAM * parameter_count_per_rank(work.model, dims) / memory_bw + cal.step_overhead_s
    links = Links(acc, dims, devices_per_node, cal, sharing)
    comm = communication(work, layout, links, compute_s, attention_flops(work, layout) / rate)
    host = wrapper_host_work(work, layout, cal) * sharing
    host_s = max(0.0, host - compute_s) if acc.overlap else host
    syncs = links.blocking_calls + 1  # and the end of the step (gradient norm, DDP's last bucket)
    skew_s = syncs * cal.skew_after(dims.world_size, (compute_s + host_s) / syncs) if dims.world_size > 1 else 0.0
    step_s = compute_s + optimizer_s + sum(comm.values()) + host_s + skew_s
    memory = memory_per_device(work, layout)
    b = work.global_batch // dims.dp
    return Prediction(
        layout=layout, compute_s=compute_s, optimizer_s=optimizer_s, comm_s=comm, host_s=host_s, skew_s=skew_s, memory=memory,
        fits=memory["total"] <= MEMORY_HEADROOM * acc.memory_bytes, step_s=step_s,
        mfu=model_flops / step_s / acc.peak_flops if acc.peak_flops else float("nan"),
        tokens_per_s_per_device=b * dims.dp * work.tokens / step_s / dims.world_size,
    )
