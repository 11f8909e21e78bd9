"""Forward kernels: partial statistics, finalize (+ running-statistic updates), apply, single pass.

Training, large reductions (two launches, x read twice):
    bn_stats_kernel     -> fp32 partial (sum, M2) per (part, statistic channel), of x - pivot;
                           the last program of a channel tile to finish merges its parts in a
                           fixed order (finalize_channels): offset, rstd; running stats
    bn_apply_kernel     -> y = act((x - m) * scale + shift [+ residual])
Synchronized batch norm merges every process's moments in bn_finalize_kernel (same helper).
Training, reductions that fit on chip: bn_fused_forward_kernel reads x once and writes y.
Inference: bn_apply_kernel with FROM_RUNNING computes its coefficients from the running statistics.

The per-channel maths after the statistics (renorm r/d and clipping, adjustment, gamma/beta, the
running-statistic update in either momentum convention) is one helper, ``channel_affine_and_update``,
used by the finalize and the single-pass kernels alike.

Centre and offset. In training the batch mean is kept as two numbers per channel: the centre c,
the channel's pivot sample (x's first element, see load_pivot), and ``Offset`` o = mean - c, small
and accurate. The kernels subtract m = fl(c + o), the mean rounded once, whose error
e = (c + o) - m is exact (common.mean_and_error), and fold e into their per-channel coefficients:
    y = (x - mean) * scale + shift = (x - m) * scale + (shift - e * scale)
x - m is exact for data near the mean, so data such as 1000 + 0.01 * noise keep their digits in y
and in the gradients, and e (at most half an ulp of m: 3e-5 at 1000) is not lost either. The
backward's sums are taken about the same m, so its ReLU mask and its sums share one subtraction
per element. The centre is not stored: every kernel reloads it from x (load_centre). Where there
is no pivot, the centre is the mean itself, stored in ``Centre``, and the offset is 0: inference
(the running mean) and sync BN (the merged batch mean).

What a forward leaves for backward is thus 8 bytes per statistic channel in fp32, as torch's
mean and invstd: (offset, rstd), or (centre, rstd); and with renorm or the Keras adjustment the
pre-gamma affine (PreScale, PreShift) per parameter channel. scale and shift are recomputed from them
and the parameters by every kernel that needs them (channel_coefficients), in the forward's order
of operations: the same bits, so the ReLU mask backward recomputes is the forward's.
"""

import triton
import triton.language as tl

from .common import (
    activation,
    arrive_in_group,
    batch_mean,
    chan_merge,
    channel_block,
    channel_coefficients,
    channel_offset,
    finalize_tile,
    fold_mean_error,
    given,
    last_tile,
    last_to_arrive,
    load_centre,
    load_channel_values,
    load_pivot,
    load_tile,
    mean_and_error,
    mean_from_sum,
    normalized,
    program_ranges,
    rows_aligned,
    rows_flat,
    same_strides,
    sqrt_rn,
    store_cut,
    store_relu_cuts,
    tile_indices,
    tile_moments,
    tile_offsets,
    tile_pointers,
    widen,
)

# values of the RENORM constexpr (global constexprs, so the kernels compare against the names;
# the host side uses their int values, ops.RENORM_*)
RENORM_NONE = tl.constexpr(0)
RENORM_KERAS = tl.constexpr(1)  # reference: renorm_mean / renorm_stddev buffers, Keras rules
RENORM_TORCH = tl.constexpr(2)  # reference: running_mean / running_var, r clipped to [1/rmax, rmax]

# The float hyper-parameters reach the kernels as a small tensor in the statistics dtype, not as
# scalar arguments (Triton passes Python floats as fp32, which would round float64's eps and
# momentum to ~1e-8); ops.hyper_tensor builds it in this order.
HYPER_FIELDS = ("eps", "momentum", "renorm_momentum", "rmin", "rmax", "dmax")


@triton.jit
def load_hyper(Hyper):
    """(eps, momentum, renorm_momentum, rmin, rmax, dmax) from the hyper-parameter tensor."""
    return (tl.load(Hyper + 0), tl.load(Hyper + 1), tl.load(Hyper + 2), tl.load(Hyper + 3),
            tl.load(Hyper + 4), tl.load(Hyper + 5))


@triton.jit
def channel_affine_and_update(
    c, c_mask,                     # parameter-channel indices (vector or scalar) and their mask
    batch_mean, batch_var, n,      # fp32 batch statistics of those channels (biased variance), count
    Weight, Bias,                  # [K] gamma, beta (when HAS_WEIGHT / HAS_BIAS)
    AdjScale, AdjBias,             # [K] Keras adjustment (when HAS_ADJUST)
    PreScale, PreShift,                # [K] out: the pre-gamma affine (a*r, a*d + b_adj) for backward
    RunMean, RunVar,               # [K] running / moving mean and variance, updated in place
    NumBatches,                    # [1] int64 batches seen (CUMULATIVE momentum; COUNT_BATCH)
    RenormMean, RenormStd,         # [K] Keras renorm_mean / renorm_stddev, updated in place
    MovingStd,                     # [K] Keras moving_stddev, updated in place
    Hyper,                         # [6] eps, momentum, renorm_momentum, rmin, rmax, dmax (ACC dtype)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADJUST: tl.constexpr,
    RENORM: tl.constexpr, UPDATE_RUNNING: tl.constexpr, UNBIASED: tl.constexpr,
    CUMULATIVE: tl.constexpr, SAVE_PRE_AFFINE: tl.constexpr, COUNT_BATCH: tl.constexpr,
):
    """Returns (multiplier, shift) with y = x_hat * multiplier + shift, and updates the state.

    momentum / renorm_momentum are the weight of the NEW value: PyTorch's momentum, or 1 - Keras's.
    Every state value is read before any is written (r and d use the pre-update statistics).
    COUNT_BATCH: NumBatches still holds the count before this batch (the launch increments it once
    its every program has read it, see ``count_batch``).
    A channel that saw no element (n == 0: every process of sync BN empty) keeps its state.
    """
    eps, momentum, renorm_momentum, rmin, rmax, dmax = load_hyper(Hyper)
    pre_scale = tl.full(batch_mean.shape, 1.0, batch_mean.dtype)
    pre_shift = tl.zeros(batch_mean.shape, batch_mean.dtype)
    batch_std = sqrt_rn(batch_var + eps)
    if RENORM != RENORM_NONE:
        # Batch renormalization (Ioffe 2017): y = (x_hat * r + d) * gamma + beta with
        # r = std_B / s and d = (mean_B - m) / s against reference statistics (m, s), both
        # constants for autograd, clipped to [rmin, rmax] and [-dmax, dmax].
        if RENORM == RENORM_KERAS:
            # tf_keras divides by max(renorm_stddev, sqrt(eps)): a reference stddev that has
            # decayed towards 0 cannot blow r and d up
            ref_mean = tl.load(RenormMean + c, mask=c_mask, other=0.0).to(batch_mean.dtype)
            ref_std = tl.maximum(tl.load(RenormStd + c, mask=c_mask, other=1.0).to(batch_mean.dtype),
                                 sqrt_rn(eps + tl.zeros(batch_mean.shape, batch_mean.dtype)))
        else:
            ref_mean = tl.load(RunMean + c, mask=c_mask, other=0.0).to(batch_mean.dtype)
            ref_std = sqrt_rn(tl.load(RunVar + c, mask=c_mask, other=1.0).to(batch_mean.dtype) + eps)
        r = batch_std / ref_std
        d = (batch_mean - ref_mean) / ref_std
        # where() rather than min/max so that a NaN stays a NaN in its own channel
        r = tl.where(r < rmin, rmin, r)
        r = tl.where(r > rmax, rmax, r)
        d = tl.where(d < -dmax, -dmax, d)
        d = tl.where(d > dmax, dmax, d)
        pre_scale = r
        pre_shift = d
    if HAS_ADJUST:
        adj_scale = tl.load(AdjScale + c, mask=c_mask, other=1.0).to(batch_mean.dtype)
        adj_bias = tl.load(AdjBias + c, mask=c_mask, other=0.0).to(batch_mean.dtype)
        pre_shift = pre_shift * adj_scale + adj_bias
        pre_scale = pre_scale * adj_scale
    if SAVE_PRE_AFFINE:
        tl.store(PreScale + c, pre_scale, mask=c_mask)
        tl.store(PreShift + c, pre_shift, mask=c_mask)
    multiplier = pre_scale
    shift = pre_shift
    if HAS_WEIGHT:
        w = tl.load(Weight + c, mask=c_mask, other=1.0).to(batch_mean.dtype)
        multiplier = multiplier * w
        shift = shift * w
    if HAS_BIAS:
        shift += tl.load(Bias + c, mask=c_mask, other=0.0).to(batch_mean.dtype)

    if UPDATE_RUNNING:
        c_mask = c_mask & (n > 0)
        f = momentum
        if CUMULATIVE:
            # the count includes this batch; with COUNT_BATCH this launch adds it at its end
            seen = tl.load(NumBatches)
            if COUNT_BATCH:
                seen += 1
            f = 1.0 / seen.to(batch_mean.dtype)
        old_mean = tl.load(RunMean + c, mask=c_mask, other=0.0).to(batch_mean.dtype)
        tl.store(RunMean + c, old_mean + (batch_mean - old_mean) * f, mask=c_mask)
        if RENORM == RENORM_KERAS:
            old_rmean = tl.load(RenormMean + c, mask=c_mask, other=0.0).to(batch_mean.dtype)
            old_rstd = tl.load(RenormStd + c, mask=c_mask, other=0.0).to(batch_mean.dtype)
            old_mstd = tl.load(MovingStd + c, mask=c_mask, other=0.0).to(batch_mean.dtype)
            tl.store(RenormMean + c, old_rmean + (batch_mean - old_rmean) * renorm_momentum,
                     mask=c_mask)
            tl.store(RenormStd + c, old_rstd + (batch_std - old_rstd) * renorm_momentum,
                     mask=c_mask)
            new_mstd = old_mstd + (batch_std - old_mstd) * f
            tl.store(MovingStd + c, new_mstd, mask=c_mask)
            new_var = new_mstd * new_mstd - eps
            tl.store(RunVar + c, tl.where(new_var < 0.0, 0.0, new_var), mask=c_mask)  # NaN stays
        else:
            value_var = batch_var
            if UNBIASED:
                value_var = batch_var * (n / tl.maximum(n - 1.0, 1.0))
            old_var = tl.load(RunVar + c, mask=c_mask, other=0.0).to(batch_mean.dtype)
            tl.store(RunVar + c, old_var + (value_var - old_var) * f, mask=c_mask)
    return multiplier, shift


@triton.jit
def shifted_sums(X, shift, a_begin, a_end, b_begin, b_end, s_fixed, R1, K, stride_x, ACC: tl.constexpr,
              HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
              ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr, SHIFT_IS_X: tl.constexpr,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """The sums of d and d * d per statistic channel, d = x - shift (0 where masked off), over
    every tile of this program's ranges. Each lane (element of a [BLOCK_A, BLOCK_B] tile, always
    the same statistic channel) accumulates its own: three arithmetic instructions per element,
    no reduction across lanes inside the loop; the lanes are added once, at the end. Channels
    fast, the program's channels are one tile wide: the outer loop runs once.
    SHIFT_IS_X: the shift is a value of X (the pivot), so masked-off lanes load it and give 0
    with no select."""
    s1 = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    s2 = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    for b0 in range(b_begin, b_end, BLOCK_B):
        for a0 in range(a_begin, a_end, BLOCK_A):
            a, b, b_mask, mask = tile_indices(a0, b0, a_end, b_end, BLOCK_A, BLOCK_B, INT64)
            offs = tile_offsets(a, b, s_fixed, R1, K, stride_x, HAS_GROUPS, CHANNELS_FAST,
                                ROWS_FLAT, ALIGN)
            if SHIFT_IS_X:
                x = tl.load(X + offs, mask=mask, other=shift.to(X.dtype.element_ty),
                            eviction_policy="evict_last")  # bn_apply_kernel reads it again
                d = x.to(ACC) - shift
            else:
                x = tl.load(X + offs, mask=mask, other=0.0, eviction_policy="evict_last")
                d = tl.where(mask, x.to(ACC) - shift, 0.0)
            s1 += d
            s2 += d * d
    s1 = tl.sum(s1, 0)
    s2 = tl.sum(s2, 0)
    if not CHANNELS_FAST:  # one channel
        s1 = tl.sum(s1, 0)
        s2 = tl.sum(s2, 0)
    return s1, s2


@triton.heuristics({"ROWS_FLAT": rows_flat("x"), "ALIGN": rows_aligned("x"),
                    **given(STORE_PIVOT="Pivot", FINALIZE="Counter", HAS_WEIGHT="Weight",
                            HAS_BIAS="Bias", HAS_ADJUST="AdjScale", SAVE_PRE_AFFINE="PreScale",
                            HAS_CUT="Cut")})
@triton.jit
def bn_stats_kernel(
    X,                    # activation, addressed through its strides
    PartSum, PartM2,      # [n_parts (+ groups), S] out: per-part sum of (x - Pivot) and M2 of each channel
    Pivot,                # [S] out (STORE_PIVOT): the sample each channel's sums are relative to
    Counter,              # [n_channel_tiles * (1 + groups) + 1] int32 zeros (FINALIZE); left zeros
    Offset, Rstd,         # [S] out (FINALIZE): batch mean - pivot, 1/std
    Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,  # as bn_finalize_kernel
    RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd, Hyper,
    Cut,                  # [2S] out (HAS_CUT, FINALIZE): the fused ReLU's cuts (common.relu_cut)
    sizes,                # see common.SIZE_FIELDS
    stride_x,             # (r0, r1, g, k)
    HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
    ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr, STORE_PIVOT: tl.constexpr,
    FINALIZE: tl.constexpr, HAS_CUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ADJUST: tl.constexpr, RENORM: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    UNBIASED: tl.constexpr, CUMULATIVE: tl.constexpr, SAVE_PRE_AFFINE: tl.constexpr,
    COUNT_BATCH: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    GROUP_P: tl.constexpr,
):
    """A part's (sum of x - pivot, M2) per statistic channel, by shifted sums.

    Every part of a channel shifts by the same sample, the pivot (its first), so the parts' sums
    stay small and merge without rounding at the data's offset. Each lane sums d = x - pivot and
    d * d over all of the program's tiles (shifted_sums); the lanes are added once, at the end, and
    M2 = sum(d * d) - sum(d)**2 / n. That subtraction loses about log2(sum(d * d) / M2) bits:
    nothing for data within a few standard deviations of the pivot (ill-conditioned data such as
    1000 + 0.01 * noise included: the pivot is one of them), but a pivot far out in the tail would
    cost digits. So when sum(d * d) > 64 * M2 in a channel (a pivot more than ~8 standard
    deviations from the part's mean) the program reads its tiles once more, shifted by the part's
    mean, and takes M2 from those sums (the two-pass algorithm; rare, and read from L2).

    With FINALIZE the program that stores a channel tile's last part (``last_to_arrive``) then
    merges that tile's parts and writes its offsets, rstd and running statistics, as
    bn_finalize_kernel would: one launch instead of two. With GROUP_P the merge has two levels
    (arrive_in_group): the last of each GROUP_P parts merges them into a row after the parts, and the
    last of those merges the rows. Ghost batches (a parameter channel's groups
    lie in different tiles) wait for the last program of the whole grid instead, which finalizes
    every channel. COUNT_BATCH: the last tile to finalize adds this batch to NumBatches (after
    every tile has read it). HAS_CUT (a training ReLU without a residual): the finalize also
    writes each channel's ReLU cut, which the backward's whole tiles compare with
    (common.store_relu_cuts)."""
    ACC = PartSum.dtype.element_ty
    R1, K, S, A, B, a_chunk, b_chunk, n_channel_tiles, n_b_parts = sizes
    part, a_begin, a_end, b_begin, b_end, s_fixed = program_ranges(
        tl.program_id(0), n_channel_tiles, n_b_parts, A, B, a_chunk, b_chunk, BLOCK_B, CHANNELS_FAST,
        INT64, ALIGN)
    b_first = b_begin + tl.arange(0, BLOCK_B)
    pivot = load_pivot(X, b_first, b_first < b_end, s_fixed, K, stride_x, ACC,
                       HAS_GROUPS, CHANNELS_FAST)
    total, sum_sq = shifted_sums(X, pivot, a_begin, a_end, b_begin, b_end, s_fixed, R1, K,
                                 stride_x, ACC, HAS_GROUPS, CHANNELS_FAST, INT64, ROWS_FLAT, ALIGN,
                                 True, BLOCK_A, BLOCK_B)
    # elements per statistic channel in this part (the same for every channel of the program)
    n = ((a_end - a_begin) * (b_end - b_begin)).to(ACC)
    if CHANNELS_FAST:
        n = (a_end - a_begin).to(ACC)
    n = tl.maximum(n, 1.0)
    m2 = sum_sq - total * (total / n)
    far = sum_sq > 64.0 * m2  # a pivot far from the mean: two passes
    if CHANNELS_FAST:
        far = tl.max(far.to(tl.int32), 0) > 0
    if far:
        mean_d = total / n
        if CHANNELS_FAST:
            mean_d = mean_d[None, :]
        t1, t2 = shifted_sums(X, pivot + mean_d, a_begin, a_end, b_begin, b_end, s_fixed, R1, K,
                              stride_x, ACC, HAS_GROUPS, CHANNELS_FAST, INT64, ROWS_FLAT, ALIGN,
                              False, BLOCK_A, BLOCK_B)
        m2 = t2 - t1 * (t1 / n)
    m2 = tl.where(m2 < 0.0, 0.0, m2)  # rounding; a NaN stays a NaN
    if CHANNELS_FAST:
        b = b_begin + tl.arange(0, BLOCK_B)
        tl.store(PartSum + part * S + b, total, mask=b < b_end)
        tl.store(PartM2 + part * S + b, m2, mask=b < b_end)
        if STORE_PIVOT and part == 0:
            tl.store(Pivot + b, tl.reshape(pivot, [BLOCK_B]), mask=b < b_end)
    else:
        tl.store(PartSum + part * S + s_fixed, total)
        tl.store(PartM2 + part * S + s_fixed, m2)
        if STORE_PIVOT and part == 0:
            tl.store(Pivot + s_fixed, pivot)
    if FINALIZE:
        slot, expected, c_begin, c_end, n_parts = finalize_tile(
            tl.program_id(0), n_channel_tiles, b_begin, b_end, s_fixed, K, HAS_GROUPS,
            CHANNELS_FAST)
        b_extent = B
        if CHANNELS_FAST:
            b_extent = 1
        if GROUP_P:  # two levels (channels fast, one b part): see arrive_in_group
            last, first, in_group, n_groups, first_row, group_row = arrive_in_group(
                Counter, part, n_parts, n_channel_tiles, slot, S, GROUP_P)
            top = tl.full([], 0, tl.int1)
            if last:
                for c0 in range(c_begin, c_end, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    group_sum, group_m2, _ = merge_parts(
                        PartSum + first_row, PartM2 + first_row, PartSum, c, c < c_end, S,
                        in_group, 1, A - first * a_chunk, a_chunk, 1, 1, ACC, False, BLOCK_C,
                        BLOCK_P)
                    tl.store(PartSum + group_row + c, group_sum, mask=c < c_end)
                    tl.store(PartM2 + group_row + c, group_m2, mask=c < c_end)
                top = last_to_arrive(Counter, slot, n_groups)
            # the groups are the parts of a partition in chunks of GROUP_P * a_chunk rows
            rows, n_rows, row_chunk, n_b_rows = n_parts.to(tl.int64) * S, n_groups, a_chunk * GROUP_P, 1
        else:
            top = last_to_arrive(Counter, slot, expected)
            rows, n_rows, row_chunk, n_b_rows = 0, n_parts, a_chunk, n_b_parts
        if top:
            for c0 in range(c_begin, c_end, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                finalize_channels(
                    c, c < c_end, PartSum + rows, PartM2 + rows, PartSum, X, stride_x, Offset,
                    Rstd, Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
                    RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd,
                    K, S // K, n_rows, n_b_rows, A, row_chunk, b_extent, b_chunk, Hyper,
                    ACC, False, True, HAS_GROUPS, HAS_WEIGHT, HAS_BIAS, HAS_ADJUST, RENORM, UPDATE_RUNNING,
                    UNBIASED, CUMULATIVE, SAVE_PRE_AFFINE, COUNT_BATCH, BLOCK_C, BLOCK_P)
                if HAS_CUT:  # from what this program just stored, as the backward reads it
                    tl.debug_barrier()
                    store_relu_cuts(Cut, X, Offset, Rstd, Weight, Bias, PreScale, PreShift, c,
                                    c < c_end, K, S // K, stride_x, ACC, HAS_WEIGHT, HAS_BIAS,
                                    SAVE_PRE_AFFINE, HAS_GROUPS)
            if COUNT_BATCH:
                if HAS_GROUPS:  # the only finalizing program
                    count_batch(NumBatches)
                elif last_to_arrive(Counter, n_channel_tiles, n_channel_tiles):
                    count_batch(NumBatches)


@triton.jit
def merge_parts(PartStat, PartM2, PartCount, s, c_mask, S, n_parts, n_b_parts, A, a_chunk,
                B_count, b_chunk, ACC: tl.constexpr, HAS_COUNTS: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """(sum, M2, n) of statistic channels s from their parts, in a fixed order (deterministic).

    BLOCK_P parts at a time are loaded as one [BLOCK_P, BLOCK_C] tile. All parts are sums about
    the same pivot, so a block merges by the law of total variance in two flat sums over its
    parts p (each a tree of adds, tl.sum):

        n_B = sum n_p,   sum_B = sum sum_p,
        M2_B = sum (M2_p + n_p * (sum_p / n_p - sum_B / n_B)**2),

    the pairwise Chan tree's result without its three divisions at every level (those chained
    divisions made each block of the finalize about a microsecond deep). The blocks follow one
    another through chan_merge: ceil(n_parts / BLOCK_P) loads in sequence, each a fixed tree.

    With HAS_COUNTS (one part per process in sync BN) PartStat holds each part's mean and
    PartCount[p] its element count; else PartStat holds sums and a part's count is the size of the
    p-th (a chunk, b chunk) block of the split reduction."""
    total = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    n = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)  # parts are few: 32 bits (a 64-bit division is a call)
        p_mask = p < n_parts
        tile_mask = p_mask[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * S + s[None, :]  # offsets can pass 2**31
        p_stat = tl.load(PartStat + offs, mask=tile_mask, other=0.0, cache_modifier=".cg").to(ACC)
        p_m2 = tl.load(PartM2 + offs, mask=tile_mask, other=0.0, cache_modifier=".cg").to(ACC)
        if HAS_COUNTS:
            count = tl.load(PartCount + p, mask=p_mask, other=0.0, cache_modifier=".cg").to(ACC)
            p_mean = p_stat
            p_sum = p_stat * count[:, None]
        else:
            pa = (p // n_b_parts).to(tl.int64)  # chunk bounds and counts can pass 2**31
            pb = (p % n_b_parts).to(tl.int64)
            count = ((tl.minimum(A, (pa + 1) * a_chunk) - pa * a_chunk)
                     * (tl.minimum(B_count, (pb + 1) * b_chunk) - pb * b_chunk)).to(ACC)
            count = tl.where(p_mask, count, 0.0)
            p_sum = p_stat
            p_mean = p_sum / tl.maximum(count, 1.0)[:, None]
        block_n = tl.sum(count, 0)
        block_sum = tl.sum(p_sum, 0)
        deviation = p_mean - (block_sum / tl.maximum(block_n, 1.0))[None, :]
        block_m2 = tl.sum(p_m2 + count[:, None] * (deviation * deviation), 0)
        total, m2, n = chan_merge(total, m2, n, block_sum, block_m2, block_n)
    return total, m2, n


@triton.jit
def bn_merge_kernel(
    PartSum, PartM2,               # [n_parts, S] partial statistics
    Pivot,                         # [S] the parts' sums are of x - Pivot
    OutMean, OutM2,                # [S] out: merged mean and M2 (a process's local moments)
    S, n_parts, n_b_parts, A, a_chunk, B_count, b_chunk, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    ACC = PartSum.dtype.element_ty
    s = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_mask = s < S
    total, m2, n = merge_parts(PartSum, PartM2, PartSum, s, s_mask, S, n_parts, n_b_parts, A,
                              a_chunk, B_count, b_chunk, ACC, False, BLOCK_C, BLOCK_P)
    mean = mean_from_sum(tl.load(Pivot + s, mask=s_mask, other=0.0), total, n)
    tl.store(OutMean + s, mean, mask=s_mask)
    tl.store(OutM2 + s, m2, mask=s_mask)


@triton.jit
def count_batch(NumBatches):
    """num_batches_tracked += 1, by the one program that runs this (torch's modules count every
    training batch; here the launch does it instead of a separate device op)."""
    tl.store(NumBatches, tl.load(NumBatches) + 1)


@triton.jit
def finalize_channels(
    c, c_mask,                     # parameter channels (a vector) and their mask
    PartStat, PartM2, PartCount,
    X, stride_x,                   # HAS_PIVOT: the parts are of x - pivot (x's first element)
    Stat,                          # [S] out: the offsets (HAS_PIVOT), else the means (centres)
    Rstd,                          # [S] out
    Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
    RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd,
    K, G, n_parts, n_b_parts, A, a_chunk, B_count, b_chunk, Hyper,
    ACC: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PIVOT: tl.constexpr,
    HAS_GROUPS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADJUST: tl.constexpr,
    RENORM: tl.constexpr, UPDATE_RUNNING: tl.constexpr, UNBIASED: tl.constexpr,
    CUMULATIVE: tl.constexpr, SAVE_PRE_AFFINE: tl.constexpr, COUNT_BATCH: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Merges the parts of parameter channels c (merge_parts) and writes, per statistic channel,
    Rstd and either the offset of the mean from x's pivot (HAS_PIVOT: the parts are of x - pivot)
    or the mean itself (the parts are of x: sync BN's merged moments), which is then the centre
    the kernels subtract; updates the running statistics (and PreScale / PreShift). With ghost batches
    (G > 1) each group is normalized by its own statistics while the running statistics and renorm
    r/d use the mean over groups of the means and biased variances. scale and shift are not
    stored: the kernels recompute them (channel_coefficients)."""
    S = G * K
    eps = tl.load(Hyper)
    sum_mean = tl.zeros([BLOCK_C], ACC)
    sum_var = tl.zeros([BLOCK_C], ACC)
    n = tl.zeros([BLOCK_C], ACC)
    for g in range(G):
        s = g * K + c
        total, m2, n = merge_parts(PartStat, PartM2, PartCount, s, c_mask, S, n_parts, n_b_parts,
                                   A, a_chunk, B_count, b_chunk, ACC, HAS_COUNTS, BLOCK_C,
                                   BLOCK_P)
        var = m2 / tl.maximum(n, 1.0)
        offset = total / tl.maximum(n, 1.0)
        centre = tl.zeros_like(offset)
        if HAS_PIVOT:  # the pivot, as load_pivot reads it (64-bit offsets: s * stride can pass 2**31)
            pivot_offs = channel_offset(s.to(tl.int64), K, stride_x, HAS_GROUPS)
            centre = tl.load(X + pivot_offs, mask=c_mask, other=0.0).to(ACC)
        tl.store(Stat + s, offset, mask=c_mask)
        tl.store(Rstd + s, 1.0 / sqrt_rn(var + eps), mask=c_mask)
        sum_mean += mean_from_sum(centre, total, n)
        sum_var += var
    channel_affine_and_update(
        c, c_mask, sum_mean / G, sum_var / G, n, Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
        RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd, Hyper,
        HAS_WEIGHT, HAS_BIAS, HAS_ADJUST, RENORM, UPDATE_RUNNING, UNBIASED, CUMULATIVE, SAVE_PRE_AFFINE,
        COUNT_BATCH)


@triton.heuristics(given(HAS_COUNTS="PartCount", HAS_WEIGHT="Weight", HAS_BIAS="Bias",
    HAS_ADJUST="AdjScale", SAVE_PRE_AFFINE="PreScale"))
@triton.jit
def bn_finalize_kernel(
    PartStat, PartM2,              # [n_parts, S] partial statistics (see merge_parts)
    PartCount,                     # [n_parts] element count of each part (HAS_COUNTS)
    Centre, Rstd,                  # [S] out: the batch mean (the centre the kernels subtract), 1/std
    Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
    RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd,
    K, G, n_parts, n_b_parts, A, a_chunk, B_count, b_chunk,
    Hyper,                         # [6] see HYPER_FIELDS
    HAS_COUNTS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADJUST: tl.constexpr,
    RENORM: tl.constexpr, UPDATE_RUNNING: tl.constexpr, UNBIASED: tl.constexpr,
    CUMULATIVE: tl.constexpr, SAVE_PRE_AFFINE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program per BLOCK_C parameter channels (finalize_channels): the separate finalize of
    synchronized batch norm, whose parts are every process's moments."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    finalize_channels(
        c, c < K, PartStat, PartM2, PartCount, None, (0, 0, 0, 0), Centre, Rstd,
        Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
        RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd,
        K, G, n_parts, n_b_parts, A, a_chunk, B_count, b_chunk, Hyper,
        PartStat.dtype.element_ty, HAS_COUNTS, False, False, HAS_WEIGHT, HAS_BIAS, HAS_ADJUST,
        RENORM, UPDATE_RUNNING, UNBIASED, CUMULATIVE, SAVE_PRE_AFFINE, False, BLOCK_C, BLOCK_P)


@triton.jit
def apply_at(x_ptrs, y_ptrs, z_ptrs, mask, mean, scale, shift, ACC: tl.constexpr,
             HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    """y = act((x - m) * scale + shift [+ residual]) of one tile, given its pointers (z_ptrs:
    the residual's, HAS_RESIDUAL). x and the residual are read for the last time (evict first); y
    is streamed out (.cs). A constant-true mask (a whole tile) costs nothing."""
    x = widen(load_tile(x_ptrs, mask, "evict_first"), ACC)
    y = activation(normalized(x, mean, scale, shift), z_ptrs, mask, HAS_RESIDUAL, RELU,
                   "evict_first")
    tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=mask, cache_modifier=".cs")


@triton.jit
def apply_pointers(X, Y, Residual, a0, b, s_fixed, R1, K, stride_x, stride_y, stride_z,
                   HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr,
                   BLOCK_A: tl.constexpr):
    """tile_pointers of x, y and the residual (absent: x's, never read) for the rows a0 +
    [0, BLOCK_A) and columns b."""
    x_ptrs = tile_pointers(X, a0, b, s_fixed, R1, K, stride_x, HAS_GROUPS, CHANNELS_FAST, ROWS_FLAT,
                           ALIGN, INT64, BLOCK_A)
    y_ptrs = tile_pointers(Y, a0, b, s_fixed, R1, K, stride_y, HAS_GROUPS, CHANNELS_FAST, ROWS_FLAT,
                           ALIGN, INT64, BLOCK_A)
    z_ptrs = x_ptrs
    if HAS_RESIDUAL:
        z_ptrs = tile_pointers(Residual, a0, b, s_fixed, R1, K, stride_z, HAS_GROUPS,
                               CHANNELS_FAST, ROWS_FLAT, ALIGN, INT64, BLOCK_A)
    return x_ptrs, y_ptrs, z_ptrs


@triton.heuristics({**given(HAS_RESIDUAL="Residual", HAS_CENTRE="Centre", HAS_OFFSET="Offset",
                            KEEP_STATS="Rstd", HAS_WEIGHT="Weight", HAS_BIAS="Bias",
                            HAS_PRE_AFFINE="PreScale", FROM_RUNNING="RunMean"),
                    "ROWS_FLAT": rows_flat("x", "y", "z"), "ALIGN": rows_aligned("x", "y", "z"),
                    "SAME_STRIDES": same_strides("y", "z")})
@triton.jit
def bn_apply_kernel(
    X, Y, Residual,                # activation in, output, optional residual added before the act.
    Centre,                        # [S] centres (HAS_CENTRE; out when FROM_RUNNING), else x's pivots
    Offset,                        # [S] batch mean - centre (HAS_OFFSET), else 0
    Rstd,                          # [S] 1/std (out when FROM_RUNNING; None there: nothing kept)
    Weight, Bias,                  # [K] gamma, beta
    PreScale, PreShift,                # [K] the pre-gamma affine (HAS_PRE_AFFINE: renorm, adjustment)
    RunMean, RunVar,               # [K] for FROM_RUNNING (inference)
    Hyper,                         # [6] see HYPER_FIELDS (eps, for FROM_RUNNING)
    sizes,                         # see common.SIZE_FIELDS
    stride_x, stride_y, stride_z,  # each (r0, r1, g, k)
    HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, HAS_CENTRE: tl.constexpr,
    HAS_OFFSET: tl.constexpr, KEEP_STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PRE_AFFINE: tl.constexpr, FROM_RUNNING: tl.constexpr,
    ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr, SAME_STRIDES: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """y = act((x - m) * scale + shift [+ residual]): training, from the finalized statistics
    (m the rounded mean, batch_mean; scale and shift recomputed, channel_coefficients);
    inference (FROM_RUNNING), from the running statistics, keeping the running mean (the
    centre) and rstd for backward."""
    if FROM_RUNNING:
        ACC = Hyper.dtype.element_ty
    else:
        ACC = Rstd.dtype.element_ty
    if SAME_STRIDES:  # one tile of offsets for every tensor (common.same_strides)
        stride_y = stride_x
        stride_z = stride_x
    R1, K, S, A, B, a_chunk, b_chunk, n_channel_tiles, n_b_parts = sizes
    part, a_begin, a_end, b_begin, b_end, s_fixed = program_ranges(
        tl.program_id(0), n_channel_tiles, n_b_parts, A, B, a_chunk, b_chunk, BLOCK_B, CHANNELS_FAST,
        INT64, ALIGN)
    bc, bc_mask = channel_block(b_begin, b_end, s_fixed, S, BLOCK_B, CHANNELS_FAST)
    if FROM_RUNNING:
        eps = tl.load(Hyper)
        mean = load_channel_values(RunMean, bc, bc_mask, bc, ACC, CHANNELS_FAST)
        rstd = 1.0 / sqrt_rn(load_channel_values(RunVar, bc, bc_mask, bc, ACC, CHANNELS_FAST) + eps)
        scale = rstd
        if HAS_WEIGHT:
            scale = rstd * load_channel_values(Weight, bc, bc_mask, bc, ACC, CHANNELS_FAST)
        shift = tl.zeros_like(scale)
        if HAS_BIAS:
            shift += load_channel_values(Bias, bc, bc_mask, bc, ACC, CHANNELS_FAST)
        # what backward needs: the centre is the running mean (the offset 0), and rstd
        if KEEP_STATS and part == 0:
            if CHANNELS_FAST:
                tl.store(Centre + bc[None, :], mean, mask=bc_mask[None, :])
                tl.store(Rstd + bc[None, :], rstd, mask=bc_mask[None, :])
            else:
                tl.store(Centre + bc, mean)
                tl.store(Rstd + bc, rstd)
    else:
        mean, mean_error = batch_mean(load_centre(Centre, X, bc, bc_mask, K, stride_x, ACC,
                                                  HAS_CENTRE, HAS_GROUPS, CHANNELS_FAST),
                                      Offset, bc, bc_mask, ACC, HAS_OFFSET, CHANNELS_FAST)
        scale, shift = channel_coefficients(mean_error, Rstd, Weight, Bias, PreScale, PreShift, bc,
                                            bc_mask, K, ACC, HAS_OFFSET, HAS_WEIGHT, HAS_BIAS,
                                            HAS_PRE_AFFINE, HAS_GROUPS, CHANNELS_FAST)
    # backwards, in reverse order of bn_stats_kernel's walk of the same partition (training):
    # the tiles it read last are still in L2
    b_last, n_b = last_tile(b_begin, b_end, BLOCK_B)
    for j in range(0, n_b):
        b0 = b_last - j * BLOCK_B
        a_full = a_begin
        if CHANNELS_FAST and ROWS_FLAT and BLOCK_B >= 32 and not HAS_GROUPS and not FROM_RUNNING:
            # a whole channel tile: its last row tile first, masked, then the whole row tiles
            # before it, unmasked, each at a scalar base (Ptr + a0 * stride r1, tile_pointers)
            # plus offsets the loop does not change. (Pointers carried from tile to tile cost
            # register moves every tile: bf16 32 x 128 with the residual, 285 instructions a
            # tile against 267; the backward's loops keep carrying theirs, which is cheaper
            # there.) Rows of 32+ channels only: narrower ones hold a pointer per element, not
            # per vector, and spilled (1024 x 4 fp32 with a residual: 156 B; ghost batches,
            # int64: 8 B). Not in inference: triton 3.6 failed to compile it there ("operand
            # does not dominate this use" in TritonGPURemoveLayoutConversions, 2026-12-01).
            if b_end - b0 == BLOCK_B:
                a_full = a_begin + (a_end - a_begin) // BLOCK_A * BLOCK_A
                a, b, b_mask, mask = tile_indices(a_full, b0, a_end, b_end, BLOCK_A, BLOCK_B,
                                                  INT64)
                if a_full < a_end:
                    x_ptrs, y_ptrs, z_ptrs = apply_pointers(
                        X, Y, Residual, a_full, b, s_fixed, R1, K, stride_x, stride_y, stride_z,
                        HAS_GROUPS, CHANNELS_FAST, INT64, HAS_RESIDUAL, ROWS_FLAT, ALIGN, BLOCK_A)
                    apply_at(x_ptrs, y_ptrs, z_ptrs, mask, mean, scale, shift, ACC, HAS_RESIDUAL,
                             RELU)
                whole = tl.full([BLOCK_A, BLOCK_B], 1, tl.int1)
                for i in range(0, (a_full - a_begin) // BLOCK_A):
                    x_ptrs, y_ptrs, z_ptrs = apply_pointers(
                        X, Y, Residual, a_full - (i + 1) * BLOCK_A, b, s_fixed, R1, K, stride_x,
                        stride_y, stride_z, HAS_GROUPS, CHANNELS_FAST, INT64, HAS_RESIDUAL,
                        ROWS_FLAT, ALIGN, BLOCK_A)
                    apply_at(x_ptrs, y_ptrs, z_ptrs, whole, mean, scale, shift, ACC, HAS_RESIDUAL,
                             RELU)
                a_full = a_end  # done
        # otherwise (a partial channel tile, or reduction fast) every tile masked, backwards
        a_last, n_a = last_tile(a_full, a_end, BLOCK_A)
        for i in range(0, n_a):
            a, b, b_mask, mask = tile_indices(a_last - i * BLOCK_A, b0, a_end, b_end, BLOCK_A,
                                              BLOCK_B, INT64)
            x_ptrs, y_ptrs, z_ptrs = apply_pointers(
                X, Y, Residual, a_last - i * BLOCK_A, b, s_fixed, R1, K, stride_x, stride_y,
                stride_z, HAS_GROUPS, CHANNELS_FAST, INT64, HAS_RESIDUAL, ROWS_FLAT, ALIGN, BLOCK_A)
            apply_at(x_ptrs, y_ptrs, z_ptrs, mask, mean, scale, shift, ACC, HAS_RESIDUAL, RELU)


@triton.jit
def store_output(Y, Residual, pre, a, b, s_fixed, mask, R1, K, stride_y, stride_z,
                 HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, CHANNELS_FAST: tl.constexpr):
    """y = act(pre [+ the residual's tile]) of the tile a x b, stored to Y: the single-pass
    kernels' output, whose tile (a program's whole channel slice, in registers) is read once."""
    y_offs = tile_offsets(a, b, s_fixed, R1, K, stride_y, False, CHANNELS_FAST, False, 1)
    z_ptrs = Y  # the residual's tile, HAS_RESIDUAL only
    if HAS_RESIDUAL:
        z_ptrs = Residual + tile_offsets(a, b, s_fixed, R1, K, stride_z, False, CHANNELS_FAST,
                                         False, 1)
    y = activation(pre, z_ptrs, mask, HAS_RESIDUAL, RELU, "")
    tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.heuristics(given(HAS_RESIDUAL="Residual", HAS_WEIGHT="Weight", HAS_BIAS="Bias",
    HAS_ADJUST="AdjScale", SAVE_PRE_AFFINE="PreScale", HAS_CUT="Cut"))
@triton.jit
def bn_fused_forward_kernel(
    X, Y, Residual,
    Offset, Rstd,                  # [K] fp32 out: batch mean - centre (x's pivot), 1/std
    Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
    RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd,
    Hyper,                         # [6] see HYPER_FIELDS
    Counter,                       # [1] int32 zero (COUNT_BATCH); left zero
    Cut,                           # [2K] out (HAS_CUT): the fused ReLU's cuts (common.relu_cut)
    R1, K, A, B,
    stride_x, stride_y, stride_z,  # each (r0, r1, g, k)
    CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr, HAS_CUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADJUST: tl.constexpr,
    RENORM: tl.constexpr, UPDATE_RUNNING: tl.constexpr, UNBIASED: tl.constexpr,
    CUMULATIVE: tl.constexpr, SAVE_PRE_AFFINE: tl.constexpr, COUNT_BATCH: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Single pass: the whole reduced slice of this program's channels is one tile in registers
    (no ghost batches here: G == 1)."""
    ACC = Offset.dtype.element_ty
    _, a_begin, a_end, b_begin, b_end, s_fixed = program_ranges(
        tl.program_id(0), tl.num_programs(0), 1, A, B, A, B, BLOCK_B, CHANNELS_FAST,
        INT64 and not CHANNELS_FAST, 1)  # channels fast: one part, channel tiles << 2**31
    a, b, b_mask, mask = tile_indices(a_begin, b_begin, a_end, b_end, BLOCK_A, BLOCK_B, INT64)
    x_offs = tile_offsets(a, b, s_fixed, R1, K, stride_x, False, CHANNELS_FAST, False, 1)
    pivot = load_pivot(X, b, b_mask, s_fixed, K, stride_x, ACC, False, CHANNELS_FAST)
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(ACC)
    total, m2, n = tile_moments(x, pivot, mask)
    if CHANNELS_FAST:
        centre = tl.reshape(pivot, [BLOCK_B])
        c = b
        c_mask = b_mask
    else:
        total, m2, n = tl.reduce((total, m2, n), 0, chan_merge)
        centre = pivot
        c = s_fixed
        c_mask = s_fixed < K
    offset = total / tl.maximum(n, 1.0)
    var = m2 / tl.maximum(n, 1.0)
    rstd = 1.0 / sqrt_rn(var + tl.load(Hyper))
    multiplier, shift = channel_affine_and_update(
        c, c_mask, mean_from_sum(centre, total, n), var, n, Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
        RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd, Hyper,
        HAS_WEIGHT, HAS_BIAS, HAS_ADJUST, RENORM, UPDATE_RUNNING, UNBIASED, CUMULATIVE, SAVE_PRE_AFFINE,
        COUNT_BATCH)
    if COUNT_BATCH:  # after this program's read of NumBatches (CUMULATIVE) above
        if last_to_arrive(Counter, 0, tl.num_programs(0)):
            count_batch(NumBatches)
    scale = rstd * multiplier
    mean, mean_error = mean_and_error(centre, offset)
    shift = fold_mean_error(shift, mean_error, scale)  # y = (x - mean) * scale + shift
    tl.store(Offset + c, offset, mask=c_mask)
    tl.store(Rstd + c, rstd, mask=c_mask)
    if HAS_CUT:
        store_cut(Cut, c, c_mask, K, scale, shift)
    if CHANNELS_FAST:
        mean = mean[None, :]
        scale = scale[None, :]
        shift = shift[None, :]
    store_output(Y, Residual, normalized(x, mean, scale, shift), a, b, s_fixed, mask, R1, K,
                 stride_y, stride_z, HAS_RESIDUAL, RELU, CHANNELS_FAST)
