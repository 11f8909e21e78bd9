"""Triton helpers shared by the forward and backward kernels: Chan merging, tile moments, addressing.

Tiles. Every element kernel walks 2-D tiles ``[BLOCK_A, BLOCK_B]`` in one of two orientations, picked
by the constexpr ``CHANNELS_FAST``:

* channels fast (NHWC, (N, C)): ``a`` is the flattened reduction index ``r = r0 * R1 + r1``, ``b`` is the
  statistic channel; a program owns ``BLOCK_B`` channels and a range of rows.
* reduction fast (NCHW): ``a`` is ``r0`` (batch), ``b`` is ``r1`` (spatial, contiguous), and a program
  owns ONE statistic channel ``s`` and a block of ``(r0, r1)``.

Either way the fast memory dimension is the last tile dimension, so loads coalesce.
"""

import triton
import triton.language as tl


def _streaming_loads() -> bool:
    """Whether this Triton takes cache_modifier=".cs" on loads (3.9 does, 3.6 does not)."""
    try:
        from triton.language.semantic import TritonSemantic
        TritonSemantic._str_to_load_cache_modifier(None, ".cs")
        return True
    except Exception:  # ValueError where unsupported; a private API that may move
        return False


STREAMING_LOADS = tl.constexpr(_streaming_loads())


def given(**flags: str) -> dict:
    """A ``@triton.heuristics`` map: ``FLAG="Name"`` sets the constexpr FLAG to whether the optional
    tensor argument Name was passed (not None), so callers pass None for an absent tensor instead
    of a dummy pointer plus a flag."""
    return {flag: (lambda args, name=name: args[name] is not None) for flag, name in flags.items()}


@triton.jit
def chan_merge(sum_a, m2_a, n_a, sum_b, m2_b, n_b):
    """Chan, Golub and LeVeque's pairwise merge of two (sum, M2, count) summaries of shifted data,
    M2 being the sum of squared deviations from the summary's own mean:

        n = n_a + n_b,   sum = sum_a + sum_b,
        M2 = M2_a + M2_b + (sum_b / n_b - sum_a / n_a)**2 * n_a * n_b / n.

    Sums rather than means are carried, so the mean (sum / n, divided once at the end) of data
    whose sums are exact, such as integers, is exact. Empty summaries merge exactly (n_a * n_b = 0).
    """
    n = n_a + n_b
    delta = sum_b / tl.maximum(n_b, 1.0) - sum_a / tl.maximum(n_a, 1.0)
    m2 = m2_a + m2_b + delta * delta * (n_a * (n_b / tl.maximum(n, 1.0)))
    return sum_a + sum_b, m2, n


@triton.jit
def last_to_arrive(Counter, slot, expected):
    """True in exactly one program: the last of ``expected`` programs to call this on
    ``Counter[slot]`` (an int32 that is 0 before the launch), which also resets the counter to 0 for
    the next launch (repeated calls, CUDA-graph replay). The block barrier and the release half of
    the atomic publish this program's earlier global stores; the acquire half lets the last program
    read every other program's (with loads that bypass L1, see ``merge_parts``). Only an integer
    atomic decides who continues: what the last program computes is in a fixed order, so the bits
    do not depend on which program it is."""
    tl.debug_barrier()
    arrived = tl.atomic_add(Counter + slot, 1, sem="acq_rel", scope="gpu")
    last = arrived == expected - 1
    if last:
        tl.atomic_xchg(Counter + slot, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def finalize_tile(pid, n_channel_tiles, b_begin, b_end, s_fixed, K, HAS_GROUPS: tl.constexpr,
                  CHANNELS_FAST: tl.constexpr):
    """What a split reduction's program finalizes if it arrives last (see last_to_arrive):
    (counter slot, programs expected there, first and end parameter channel, parts per channel
    tile). A channel tile's own slot and channels; with ghost batches a parameter channel's groups
    lie in different tiles, so every program waits on slot 0 and the last finalizes all K."""
    n_parts = tl.num_programs(0) // n_channel_tiles
    if HAS_GROUPS:
        slot, expected, c_begin, c_end = 0, tl.num_programs(0), 0, K
    elif CHANNELS_FAST:
        slot, expected, c_begin, c_end = pid % n_channel_tiles, n_parts, b_begin, b_end
    else:
        slot, expected, c_begin, c_end = s_fixed, n_parts, s_fixed, s_fixed + 1
    return slot, expected, c_begin, c_end, n_parts


@triton.jit
def arrive_in_group(Counter, part, n_parts, n_channel_tiles, slot, S, GROUP_P: tl.constexpr):
    """A split reduction's finalize in two levels (GROUP_P > 0, channels fast): the parts of a
    channel tile form groups of GROUP_P consecutive parts; the last of a group to arrive (this
    calls last_to_arrive on the group's counter, numbered after the tiles' of finalize_tile and
    the batch count's) merges its parts into a row after the parts (one load of [GROUP_P,
    channels]), then arrives at the tile's counter, whose last merges those rows: the parts of
    the same partition in chunks GROUP_P times longer. 1 + ceil(n_groups / BLOCK_P) loads in
    sequence instead of ceil(n_parts / BLOCK_P) (BLOCK_P = GROUP_P), each level in a fixed
    order. Returns (last of its group, its first part, its parts, groups, element offsets of the
    first part's row and of the group's row)."""
    group = part // GROUP_P
    first = group * GROUP_P
    in_group = tl.minimum(n_parts - first, GROUP_P)
    n_groups = tl.cdiv(n_parts, GROUP_P)
    last = last_to_arrive(Counter, n_channel_tiles + 1 + slot * n_groups + group, in_group)
    return (last, first, in_group, n_groups, first.to(tl.int64) * S,
            (n_parts + group).to(tl.int64) * S)


@triton.jit
def mean_from_sum(centre, total, n):
    """The mean of n values whose deviations from ``centre`` sum to ``total``: (centre * n + total)
    / n, the numerator with one rounding (a fused multiply-add), so a mean of data whose sums are
    exact (integers) is correctly rounded, however far the centre lies from it."""
    return tl.fma(centre, n, total) / tl.maximum(n, 1.0)


@triton.jit
def sqrt_rn(x):
    """Correctly rounded square root in fp32 and fp64 (tl.sqrt may be approximate in fp32)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def tile_moments(x, pivot, mask):
    """Per-column (sum of x - pivot, M2, count) over axis 0 of a tile of x (fp32, or fp64 for
    float64 inputs), two passes inside the tile, each from x itself, so that only x stays in
    registers (the single-pass and persistent forwards keep it for y; keeping x - pivot beside it
    took bn_fused_forward_kernel from 128 to 213 registers at 64 x 256 fp32):

        total = sum(x - p),   s = fl(p + total / n),   e = (p + total / n) - s   (TwoSum),
        M2 = sum((x - s)**2) - n * e**2,

    as sum((x - mu)**2) = sum((x - s)**2) - n * (mu - s)**2 for the tile's mean mu = p + total / n.
    The second pass is centred on s, a float within half an ulp of mu (exact differences for
    data near it, so M2 does not depend on the pivot); e corrects that half ulp (at 1000 + 0.01 *
    noise it would add 1e-5 of M2)."""
    n = tl.sum(mask.to(x.dtype), 0)
    total = tl.sum(tl.where(mask, x - pivot, 0.0), 0)
    s, e = mean_and_error(pivot, (total / tl.maximum(n, 1.0))[None, :])
    d = tl.where(mask, x - s, 0.0)
    m2 = tl.sum(d * d, 0) - n * tl.sum(e * e, 0)  # (the sum over a length-1 axis: e's [B] view)
    return total, tl.where(m2 < 0.0, 0.0, m2), n  # (not maximum: a NaN stays a NaN)


@triton.jit
def channel_offset(s, K, strides, HAS_GROUPS: tl.constexpr):
    """Element offset of statistic channel s = g * K + k (ghost group g, channel k) in a tensor of
    ``strides`` = (r0, r1, g, k), one tuple per tensor in every kernel."""
    if HAS_GROUPS:
        return (s // K) * strides[2] + (s % K) * strides[3]
    else:
        return s * strides[3]


@triton.jit
def program_ranges(pid, n_channel_tiles, n_b_parts, A, B, a_chunk, b_chunk,
                   BLOCK_B: tl.constexpr, CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
                   ALIGN: tl.constexpr):
    """Splits a flat program id into (part index, a range, b range, fixed channel).

    Programs are numbered channel-tile fastest. In the channels-fast orientation B is the number of
    statistic channels and the b range is this program's channel tile; otherwise B = R1 and the program
    owns channel ``s_fixed``. With INT64 every value derived here is 64-bit, so the products with
    chunk sizes and strides made from them (a_part * a_chunk, s_fixed * stride_k, part * S) cannot
    wrap for tensors past 2**31 elements.
    """
    if INT64:
        pid = pid.to(tl.int64)
    channel_tile = pid % n_channel_tiles
    part = pid // n_channel_tiles
    a_part = part // n_b_parts
    b_part = part % n_b_parts
    a_begin = a_part * a_chunk
    a_end = tl.minimum(A, a_begin + a_chunk)
    if CHANNELS_FAST:
        b_begin = channel_tile * BLOCK_B
        b_end = tl.minimum(B, b_begin + BLOCK_B)
        s_fixed = 0
    else:
        b_begin = b_part * b_chunk
        b_end = tl.minimum(B, b_begin + b_chunk)
        if ALIGN > 1:  # B and b_chunk are multiples of ALIGN (rows_aligned): say so to the compiler
            b_begin = (b_begin // ALIGN) * ALIGN
            b_end = (b_end // ALIGN) * ALIGN
        s_fixed = channel_tile
    return part, a_begin, a_end, b_begin, b_end, s_fixed


# a split kernel's ``sizes`` argument: the strided view's (R1, K, S) and its partition's (A, B,
# a_chunk, b_chunk, n_channel_tiles, n_b_parts); see layout.Geometry and tuning.TilePlan
SIZE_FIELDS = ("R1", "K", "S", "A", "B", "a_chunk", "b_chunk", "n_channel_tiles", "n_b_parts")


def _size(args, name: str) -> int:
    return args["sizes"][SIZE_FIELDS.index(name)]


def rows_flat(*tensors: str):
    """A ``@triton.heuristics`` value: whether, in every tensor named (by its strides'
    argument's suffix, e.g. "x" for stride_x), the channels-fast rows are one flat run:
    a single r0 (A <= R1: the layout folds a channels_last batch into r1) or stride_r0 ==
    R1 * stride_r1. Then row a is at a * stride_r1, with no division by R1 in the loop
    (tile_offsets' ROWS_FLAT)."""
    def flat(args) -> bool:
        if not args["CHANNELS_FAST"]:
            return False  # unused: reduction-fast offsets need no division
        R1 = _size(args, "R1")
        return _size(args, "A") <= R1 or all(
            args[f"stride_{t}"][0] == R1 * args[f"stride_{t}"][1] for t in tensors)
    return flat


def same_strides(*tensors: str, narrow_tiles: bool = True):
    """A ``@triton.heuristics`` value: whether every tensor named (see rows_flat) has x's strides,
    as when x, dy, y, dx and the residual are all contiguous in one memory format. A kernel then
    takes x's strides for all of them (SAME_STRIDES), so that the compiler computes one tile of
    offsets and each tensor's address is a scalar base plus it, one multiply-add per 16 bytes,
    where separate strides cost a tensor of pointers each (and ptxas copied them from register to
    register on every step of the loops that carried them). Not for fp64: on triton 3.6 ptxas
    capped those kernels at 128 registers and spilled 4-8 B, where separate pointers did not.
    narrow_tiles=False (the reduction): nor for channels-fast tiles narrower than 16 channels
    (rank-2 (N, 3) inputs, 1024 x 4 tiles), where the shared offsets stay live beside the
    accumulators and the reduction spilled 18-40 instructions (from 0-26); the element-wise
    kernels keep them there (the (N, 3) dx: 132-160 B of spills on 3.6 with separate pointers,
    none shared)."""
    def same(args) -> bool:
        if args["X"].element_size() > 4:
            return False
        if not narrow_tiles and args["CHANNELS_FAST"] and args["BLOCK_B"] < 16:
            return False
        return all(args[f"stride_{t}"] == args["stride_x"] for t in tensors)
    return same


def rows_aligned(*tensors: str):
    """A ``@triton.heuristics`` value for the reduction-fast orientation (NCHW): the largest
    ALIGN in 8, 4, 2 of at most 16 bytes of X's dtype that divides R1, b_chunk, the batch, group
    and channel strides of every tensor named (see rows_flat), with unit stride along r1; else 1.
    With it, rows of 196 (14 x 14) fp32 elements, 16-byte aligned but not multiples of 16
    elements, are read 16 bytes at a time: the compiler learns that the row starts and the row
    end are multiples of ALIGN (program_ranges, tile_offsets). Rows of 49 (7 x 7) stay scalar
    (odd channel strides), as do bf16 rows of 196 (8-byte aligned only: ALIGN = 4, 8-byte loads)."""
    def align(args) -> int:
        if args["CHANNELS_FAST"]:
            return 1
        values = [_size(args, "R1"), _size(args, "b_chunk")]
        for t in tensors:
            r0, r1, g, k = args[f"stride_{t}"]
            if r1 != 1:
                return 1
            values += [r0, g, k]
        for p in (8, 4, 2):  # 16 bytes of the narrowest dtype (bf16 / fp16): 8 elements
            if p * args["X"].element_size() <= 16 and all(v % p == 0 for v in values):
                return p
        return 1
    return align


@triton.jit
def tile_offsets(a, b, s_fixed, R1, K, strides, HAS_GROUPS: tl.constexpr,
                 CHANNELS_FAST: tl.constexpr, ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr):
    """Element offsets of the tile a[:, None] x b[None, :] in one tensor of ``strides`` = (r0, r1,
    g, k) (see module docstring).
    ROWS_FLAT (rows_flat): stride r0 == R1 * stride r1, so the row a is at a * stride r1.
    ALIGN (rows_aligned, reduction fast): the channel and row strides are multiples of ALIGN."""
    stride_r0, stride_r1, stride_g, stride_k = strides
    if CHANNELS_FAST and ROWS_FLAT:
        return a[:, None] * stride_r1 + channel_offset(b, K, strides, HAS_GROUPS)[None, :]
    elif CHANNELS_FAST:
        row = (a // R1) * stride_r0 + (a % R1) * stride_r1
        col = channel_offset(b, K, strides, HAS_GROUPS)
        return row[:, None] + col[None, :]
    else:
        if ALIGN > 1:  # multiples of ALIGN (rows_aligned): say so to the compiler
            stride_g = (stride_g // ALIGN) * ALIGN
            stride_k = (stride_k // ALIGN) * ALIGN
            stride_r0 = (stride_r0 // ALIGN) * ALIGN
        base = channel_offset(s_fixed, K, (stride_r0, stride_r1, stride_g, stride_k), HAS_GROUPS)
        return base + a[:, None] * stride_r0 + b[None, :] * stride_r1


@triton.jit
def tile_pointers(Ptr, a0, b, s_fixed, R1, K, strides, HAS_GROUPS: tl.constexpr,
                  CHANNELS_FAST: tl.constexpr, ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr,
                  INT64: tl.constexpr, BLOCK_A: tl.constexpr):
    """Pointers to the tile of rows a0 + [0, BLOCK_A) and columns b of one tensor (tile_offsets).
    Flat channels-fast rows: one base per tile (Ptr + a0 * stride r1, a scalar) plus offsets
    that do not depend on a0, which the compiler keeps out of a loop over tiles: an address
    costs an add per vector instead of a recomputed offset per tensor, row and tile."""
    if CHANNELS_FAST and ROWS_FLAT:
        rows = tl.arange(0, BLOCK_A)
        if INT64:
            rows = rows.to(tl.int64)
        return (Ptr + a0 * strides[1]) + tile_offsets(rows, b, s_fixed, R1, K, strides, HAS_GROUPS,
                                                      CHANNELS_FAST, ROWS_FLAT, ALIGN)
    else:
        a = a0 + tl.arange(0, BLOCK_A)
        if INT64:
            a = a.to(tl.int64)
        return Ptr + tile_offsets(a, b, s_fixed, R1, K, strides, HAS_GROUPS, CHANNELS_FAST,
                                  ROWS_FLAT, ALIGN)


@triton.jit
def flat_row_offsets(b, s_fixed, R1, K, strides, HAS_GROUPS: tl.constexpr, ALIGN: tl.constexpr,
                     INT64: tl.constexpr, BLOCK_A: tl.constexpr):
    """Offsets of rows [0, BLOCK_A) and columns b in flat channels-fast rows (tile_offsets,
    ROWS_FLAT), for tensors that share ``strides`` (same_strides): a tile at row a0 is at
    offsets + a0 * strides[1], one 32-bit add per 16-byte vector shared by every tensor, and
    each tensor's address is then one wide multiply-add (IMAD.WIDE: base + offset * element
    size). A scalar base per tensor and tile plus loop-invariant 64-bit offsets (tile_pointers)
    cost two adds per vector and tensor, and ptxas rematerialized the offsets' shifts in the
    loop where registers ran short: the bf16 ReLU reduction with cuts 7.8-7.9 instructions per
    element instead of 8.0-8.2."""
    rows = tl.arange(0, BLOCK_A)
    if INT64:
        rows = rows.to(tl.int64)
    return tile_offsets(rows, b, s_fixed, R1, K, strides, HAS_GROUPS, True, True, ALIGN)


@triton.jit
def load_pivot(X, b, b_mask, s_fixed, K, stride_x, ACC: tl.constexpr,
               HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr):
    """The first element (r0 = r1 = 0) of each channel, broadcastable against a tile. Moments are
    taken of x - pivot (the shifted-data algorithm) with one pivot per channel shared by every
    part, so values like 1000 + 0.01 * noise lose no digits to the sums. The pivot is the saved
    *centre*, the small offset mean - centre is kept beside it, and the kernels subtract their sum
    rounded once, its rounding error folded in per channel (mean_and_error, see forward.py)."""
    if CHANNELS_FAST:
        offs = channel_offset(b, K, stride_x, HAS_GROUPS)
        return tl.load(X + offs, mask=b_mask, other=0.0).to(ACC)[None, :]
    else:
        return tl.load(X + channel_offset(s_fixed, K, stride_x, HAS_GROUPS)).to(ACC)


@triton.jit
def load_tile(ptrs, mask, EVICT: tl.constexpr):
    """A tile of a tensor (0 where masked off) with an L2 eviction hint: "evict_first" where this
    is its last read, "" none (the backward reduction's, backward.REDUCE_EVICT), "evict_last"
    to keep it for a second pass. The last read
    is a streaming load (.cs: evict first in L1 and L2) where Triton has it: the eviction_policy
    form makes ptxas rebuild a cache-policy register on every loop iteration (about 6 uniform
    instructions per tile)."""
    if EVICT == "evict_first" and STREAMING_LOADS:
        return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cs")
    else:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy=EVICT)


@triton.jit
def widen(x, ACC: tl.constexpr):
    """x (a loaded tile) in the accumulation dtype. bf16 by its bits (the high half of an fp32:
    one shift or mask per element, where the compiler's conversion spends two on odd lanes)."""
    if x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True).to(ACC)
    else:
        return x.to(ACC)


@triton.jit
def load_channel_values(Ptr, b, b_mask, s_fixed, ACC: tl.constexpr, CHANNELS_FAST: tl.constexpr):
    """Per-statistic-channel values (in the accumulation dtype) broadcastable against a tile."""
    if CHANNELS_FAST:
        return tl.load(Ptr + b, mask=b_mask, other=0.0).to(ACC)[None, :]
    else:
        return tl.load(Ptr + s_fixed).to(ACC)


@triton.jit
def channel_block(b0, b_end, s_fixed, S, BLOCK_B: tl.constexpr, CHANNELS_FAST: tl.constexpr):
    """The statistic channels a tile starting at column b0 belongs to, and their mask."""
    if CHANNELS_FAST:
        bc = b0 + tl.arange(0, BLOCK_B)
        return bc, bc < b_end
    else:
        return s_fixed, s_fixed < S


@triton.jit
def load_centre(Centre, X, bc, bc_mask, K, stride_x, ACC: tl.constexpr,
                HAS_CENTRE: tl.constexpr, HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr):
    """The centre c that the kernels subtract from x (y = (x - c) * scale + shift) of the
    statistic channels bc, broadcastable to a tile: the saved Centre (inference: the running
    mean; sync BN: the batch mean), or else x's pivot, the centre of every other training
    forward, which backward reloads from the saved x instead of keeping a copy."""
    if HAS_CENTRE:
        return load_channel_values(Centre, bc, bc_mask, bc, ACC, CHANNELS_FAST)
    elif HAS_GROUPS:  # load_pivot's element, its group and channel found in 32 bits (a 64-bit
        s = bc.to(tl.int32)  # division is a subroutine); channel indices are small
        g = s // K
        offs = g.to(tl.int64) * stride_x[2] + (s - g * K).to(tl.int64) * stride_x[3]
        if CHANNELS_FAST:
            return tl.load(X + offs, mask=bc_mask, other=0.0).to(ACC)[None, :]
        else:
            return tl.load(X + offs).to(ACC)
    else:
        return load_pivot(X, bc, bc_mask, bc, K, stride_x, ACC, False,
                          CHANNELS_FAST)


@triton.jit
def mean_and_error(centre, offset):
    """(m, e): the batch mean c + o rounded once, m = fl(c + o), and its error e = (c + o) - m
    exactly (Knuth's TwoSum: six adds, no branch, exact for any two floats that do not
    overflow). |e| <= ulp(m) / 2, and fl(m + e) = m. The kernels subtract m where they used to
    subtract c and fold e where they folded o (channel_coefficients):
        (x - c) * scale + (base - o * scale) = (x - m) * scale + (base - e * scale),
    so the forward's y and the backward's ReLU mask read x - m, the difference the backward's
    sums take anyway: one subtraction per element instead of two."""
    m = centre + offset
    t = m - centre
    return m, (centre - (m - t)) + (offset - t)


@triton.jit
def batch_mean(centre, Offset, bc, bc_mask, ACC: tl.constexpr, HAS_OFFSET: tl.constexpr,
               CHANNELS_FAST: tl.constexpr):
    """(m, e) of mean_and_error for the statistic channels bc (c from load_centre, o the saved
    offset; without one the centre is the mean and e = 0). The backward's sums are taken about
    m, not about the pivot: with sum(g * (x - c)) = sum(g * (x - mean)) + o * sum(g), a gradient
    with a mean of its own makes the first sum a large number that the second nearly cancels
    (dgamma 5-8x less accurate than PyTorch's in fp32 at 100k values per channel, seen on an
    H200)."""
    if HAS_OFFSET:
        return mean_and_error(centre, load_channel_values(Offset, bc, bc_mask, bc, ACC,
                                                          CHANNELS_FAST))
    return centre, tl.zeros_like(centre)


@triton.jit
def channel_coefficients(mean_error, Rstd, Weight, Bias, PreScale, PreShift, bc, bc_mask, K,
                         ACC: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_PRE_AFFINE: tl.constexpr,
                         HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr):
    """(scale, shift) of the statistic channels bc, y = (x - m) * scale + shift with m the
    rounded batch mean and ``mean_error`` its error e (batch_mean; unused without an offset),
    from the saved rstd and the parameters (parameter channel k = bc % K), in the forward's order
    of operations (channel_affine_and_update, then fold_mean_error), so that they are the
    forward's bit for bit, and so is the ReLU mask backward recomputes with them:

        multiplier = [pre_scale] * [gamma],   base = [pre_shift] * [gamma] + [beta],
        scale = rstd * multiplier,         shift = base - e * scale.

    Without a ReLU the shift is unused (its loads are dead code; callers pass Bias = None)."""
    k = bc
    if HAS_GROUPS:  # in 32 bits: channel indices are small (a 64-bit remainder is a subroutine)
        k = bc.to(tl.int32) % K
    rstd = load_channel_values(Rstd, bc, bc_mask, bc, ACC, CHANNELS_FAST)
    multiplier = tl.full(rstd.shape, 1.0, ACC)
    shift = tl.zeros(rstd.shape, ACC)
    if HAS_PRE_AFFINE:
        multiplier = load_channel_values(PreScale, k, bc_mask, k, ACC, CHANNELS_FAST)
        shift = load_channel_values(PreShift, k, bc_mask, k, ACC, CHANNELS_FAST)
    if HAS_WEIGHT:
        w = load_channel_values(Weight, k, bc_mask, k, ACC, CHANNELS_FAST)
        multiplier = multiplier * w
        shift = shift * w
    if HAS_BIAS:
        shift += load_channel_values(Bias, k, bc_mask, k, ACC, CHANNELS_FAST)
    scale = rstd * multiplier
    if HAS_OFFSET:
        shift = fold_mean_error(shift, mean_error, scale)
    return scale, shift


@triton.jit
def saved_channel_terms(X, Centre, Offset, Rstd, Weight, Bias, PreScale, PreShift, bc, bc_mask, K,
                        stride_x, ACC: tl.constexpr, HAS_CENTRE: tl.constexpr,
                        HAS_OFFSET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_PRE_AFFINE: tl.constexpr, HAS_GROUPS: tl.constexpr,
                        CHANNELS_FAST: tl.constexpr):
    """Every backward kernel's per-channel prologue (and the forward's cuts, store_relu_cuts),
    from what the forward saved: (m, scale, shift) of the statistic channels bc, with
    m = fl(c + o) the rounded batch mean (batch_mean: c the forward's centre, load_centre, o the
    saved offset), about which the sums are taken, the dx kernels subtract and the ReLU mask is
    recomputed, and the forward's scale and shift about m (channel_coefficients, for dx and the
    ReLU mask)."""
    mean, mean_error = batch_mean(load_centre(Centre, X, bc, bc_mask, K, stride_x, ACC, HAS_CENTRE,
                                              HAS_GROUPS, CHANNELS_FAST),
                                  Offset, bc, bc_mask, ACC, HAS_OFFSET, CHANNELS_FAST)
    scale, shift = channel_coefficients(mean_error, Rstd, Weight, Bias, PreScale, PreShift, bc,
                                        bc_mask, K, ACC, HAS_OFFSET, HAS_WEIGHT, HAS_BIAS,
                                        HAS_PRE_AFFINE, HAS_GROUPS, CHANNELS_FAST)
    return mean, scale, shift


@triton.jit
def store_relu_cuts(Cut, X, Offset, Rstd, Weight, Bias, PreScale, PreShift, c, c_mask, K, G,
                    stride_x, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_PRE_AFFINE: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """The split forward's finalize (after its stores of Offset, Rstd, PreScale, PreShift and a
    block barrier): Cut [2S] (signs, then cuts) of the statistic channels of parameter channels
    c, the sign s and cut t of relu_cut from the scale and shift the backward recomputes
    (saved_channel_terms about x's pivot and the offset), once per channel, so that no backward
    program pays for them."""
    S = G * K
    for g in range(G):
        s = g * K + c
        _, scale, shift = saved_channel_terms(
            X, None, Offset, Rstd, Weight, Bias, PreScale, PreShift, s, c_mask, K, stride_x, ACC,
            False, True, HAS_WEIGHT, HAS_BIAS, HAS_PRE_AFFINE, HAS_GROUPS, True)
        store_cut(Cut, s[None, :], c_mask[None, :], S, scale, shift)


@triton.jit
def every_cut_exact(sign, b_mask):
    """Whether every channel of a block (b_mask) has an exact cut: no sign s = 0 (relu_cut); a
    block with one recomputes the mask in every tile."""
    return tl.min(tl.abs(tl.where(b_mask, sign, 1.0))) > 0.0


@triton.jit
def store_cut(Cut, s, s_mask, S, scale, shift):
    """Cut[s] = the sign, Cut[S + s] = the cut of relu_cut(scale, shift)."""
    sign, cut = relu_cut(scale, shift)
    tl.store(Cut + s, sign, mask=s_mask)
    tl.store(Cut + S + s, cut, mask=s_mask)


@triton.jit
def fold_mean_error(base, mean_error, scale):
    """The shift about the rounded mean m: base - e * scale (see mean_and_error), one
    expression for the single-pass and persistent forwards and channel_coefficients."""
    return base - mean_error * scale


@triton.jit
def tile_indices(a0, b0, a_end, b_end, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                 INT64: tl.constexpr):
    """Index vectors and the 2-D mask of the tile starting at (a0, b0)."""
    a = a0 + tl.arange(0, BLOCK_A)
    b = b0 + tl.arange(0, BLOCK_B)
    if INT64:
        a = a.to(tl.int64)
        b = b.to(tl.int64)
    a_mask = a < a_end
    b_mask = b < b_end
    return a, b, b_mask, a_mask[:, None] & b_mask[None, :]


@triton.jit
def last_tile(begin, end, BLOCK: tl.constexpr):
    """(start of the last BLOCK-wide tile of [begin, end), number of tiles): a second pass walks
    its range backwards, tile start - i * BLOCK for i in range(n), so that it first reads what
    the first pass (forwards, same partition) read last, while it is still in L2."""
    n = tl.cdiv(end - begin, BLOCK)
    return begin + (n - 1) * BLOCK, n


@triton.jit
def normalized(x, mean, scale, shift):
    """(x - m) * scale + shift: the batch norm's output before the residual and the activation,
    one expression for every kernel (pre_activation of x - m)."""
    return pre_activation(x - mean, scale, shift)


@triton.jit
def pre_activation(xm, scale, shift):
    """xm * scale + shift for xm = x - m: the compiler makes it one fused multiply-add, as every
    launch asks (launch.FP_FUSION); Triton's CPU interpreter, a multiply and an add, as torch's
    ops in functional._relu_mask. Either is monotone in xm for scale >= 0 (relu_cut)."""
    return xm * scale + shift


@triton.jit
def float_after(t):
    """The float next above t (not a NaN; -0 taken as +0), by its bits, which count the floats of
    one sign outwards from 0: the largest finite float's is +inf, -inf's the lowest finite."""
    if t.dtype == tl.float64:
        bits = t.to(tl.int64, bitcast=True)
    else:
        bits = t.to(tl.int32, bitcast=True)
    bits = tl.where(t == 0.0, 0, bits)
    return tl.where(bits >= 0, bits + 1, bits - 1).to(t.dtype, bitcast=True)


@triton.jit
def blocked(v, a, shift):
    """Whether the fused ReLU blocks the gradient at s * (x - m) = v for |scale| = a (relu_cut)."""
    return pre_activation(v, a, shift) <= 0.0


@triton.jit
def relu_cut(scale, shift):
    """The fused ReLU's recomputed mask (relu_keep) as one compare per element, per channel:
    (s, t) with, for every x,

        not ((x - m) * scale + shift <= 0)   ==   not (s * (x - m) <= t),

    s = -1 where scale < 0, else 1, and t the largest float v whose pre-activation
    v * |scale| + shift is <= 0 (the same product: s * (x - m) * |scale| = (x - m) * scale
    exactly), or NaN where there is none (the mask passes everything). Such a t exists because
    the pre-activation, one fused multiply-add on the GPU or a multiply and an add in the
    interpreter (pre_activation), never decreases as v grows. t is -shift / |scale| moved a few
    floats (blocked), then checked: blocked at t and not at the float after it. s is 0 where
    that check fails (underflow near 0, where the boundary lies further away) and where no t can
    say it: scale = 0 with shift <= 0 blocks every finite x - m but passes an infinite one
    (0 * inf is NaN). The kernels recompute the mask where s is 0."""
    sign = tl.where(scale < 0.0, -1.0, 1.0).to(scale.dtype)
    a = scale * sign
    if scale.dtype == tl.float64:
        t = -shift / a
    else:
        t = tl.div_rn(-shift, a)
    for _ in tl.static_range(3):  # up while the float after t is blocked, down while t is not
        after = float_after(t)
        t = tl.where(blocked(t, a, shift), tl.where(blocked(after, a, shift), after, t),
                     -float_after(-t))
    exact = blocked(t, a, shift) & ~blocked(float_after(t), a, shift) & (a != 0.0)
    # nothing blocked: not even x - m = -inf (or a NaN scale or shift); with a = 0: shift > 0
    lowest = tl.full(a.shape, float("-inf"), a.dtype)
    none = ~blocked(lowest, a, shift) & ((a != 0.0) | ~(shift <= 0.0))
    return (tl.where(exact | none, sign, 0.0),
            tl.where(none, tl.full(a.shape, float("nan"), a.dtype), t))


@triton.jit
def activation(pre, z_ptrs, mask, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
               EVICT: tl.constexpr):
    """act(pre [+ the residual's tile at z_ptrs]) of a normalized tile pre (``normalized``, in the
    accumulation dtype): what every forward writes as y, and what the backward's ReLU mask
    reads back from y (relu_keep). The ReLU keeps a NaN, as torch's: max(NaN, 0) is NaN here,
    not the other operand (tl.maximum's default, the hardware's fmax)."""
    if HAS_RESIDUAL:
        pre += widen(load_tile(z_ptrs, mask, EVICT), pre.dtype)
    if RELU:
        pre = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return pre


@triton.jit
def relu_keep(x, mean, scale, shift, y_ptrs, mask, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
              EVICT: tl.constexpr):
    """Where the fused ReLU passed the gradient: everywhere but where the forward's output
    y <= 0, as torch's ReLU decides (threshold_backward: a NaN y passes it, as y > 0 would not).
    With a residual (HAS_RESIDUAL) it is read from y itself (y_ptrs: the forward's output tile;
    the bytes the residual took before, and one compare per element instead of a multiply-add,
    an add and a compare: x - m and the residual would not give the mask without the forward's
    pre-activation). Without one it is recomputed from the x - m the backward reads anyway, as
    the forward computed it: not (x - m) * scale + shift <= 0 (normalized), which is y's mask
    except where a positive pre-activation rounds to 0 in y's dtype. All true without RELU (a
    constant the compiler folds). Either compare is one unordered greater-than (FSETP.GTU)."""
    if RELU:
        if HAS_RESIDUAL:
            # fp32 first: Triton's CPU interpreter compares bfloat16 wrongly; the compiler folds
            # the conversion into the compare (two bf16 or fp16 compares per instruction)
            y = load_tile(y_ptrs, mask, EVICT)
            return ~(y.to(tl.float32) <= 0.0)
        return ~(normalized(x, mean, scale, shift) <= 0.0)
    else:
        return tl.full(x.shape, 1, tl.int1)

