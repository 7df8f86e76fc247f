"""Triton device code of the fused NTM memory step; `kernels.ntm` launches it.

Phases A (content logits), B (addressing) and C (read and write) are described in
`kernels.ntm`. Triton reads TRITON_INTERPRET when these functions are defined.
"""

import triton
import triton.language as tl


@triton.jit
def _load_tile(
    memory_slot,
    start,
    offs_m,
    mask_m,
    N: tl.constexpr,
    M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rows start..start+BLOCK_N of a slot's memory, as float32, with their addresses."""
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mem_tile = memory_slot + offs_n[:, None] * M + offs_m[None, :]
    mem_mask = mask_n[:, None] & mask_m[None, :]
    mem = tl.load(mem_tile, mask=mem_mask, other=0.0).to(tl.float32)
    return offs_n, mask_n, mem_tile, mem


@triton.jit
def _content_logits(
    mem,
    offs_n,
    mask_n,
    offs_m,
    mask_m,
    keys_row,
    beta_row,
    scratch_row,
    N: tl.constexpr,
    M: tl.constexpr,
    H: tl.constexpr,
):
    """Phase A on one tile: scratch[h, n] = beta_h * cos(key_h, mem[n]) for the tile's rows."""
    row_norm = tl.sqrt(tl.sum(mem * mem, axis=1))
    for h in tl.static_range(H):
        key = tl.load(keys_row + h * M + offs_m, mask=mask_m, other=0.0)
        key_norm = tl.sqrt(tl.sum(key * key, axis=0))
        beta = tl.load(beta_row + h)
        dots = tl.sum(mem * key[None, :], axis=1)
        logits = beta * dots / (row_norm * key_norm + 1e-8)
        tl.store(scratch_row + h * N + offs_n, logits, mask=mask_n)


@triton.jit
def _address_heads(
    scratch_row,
    weights_slot,
    gate_row,
    shift_row,
    gamma_row,
    N: tl.constexpr,
    H: tl.constexpr,
    K: tl.constexpr,
    BLOCK_NF: tl.constexpr,
):
    """Phase B: turn each head's logits into its new weighting, in the pool and scratch.

    The shift needs every position's neighbours, which other threads hold: the gated
    weighting is parked in the scratch row and read back at 2K+1 offsets.
    """
    offs = tl.arange(0, BLOCK_NF)
    mask = offs < N
    for h in tl.static_range(H):
        logits = tl.load(scratch_row + h * N + offs, mask=mask, other=float("-inf"))
        peak = tl.max(logits, axis=0)
        content = tl.exp(logits - peak)
        inv_denom = 1.0 / tl.sum(content, axis=0)
        gate = tl.load(gate_row + h)
        previous = tl.load(weights_slot + h * N + offs, mask=mask, other=0.0).to(tl.float32)
        gated = gate * inv_denom * content + (1.0 - gate) * previous
        if K > 0:
            tl.debug_barrier()  # every thread has loaded its logits before they are replaced
            tl.store(scratch_row + h * N + offs, gated, mask=mask)
            tl.debug_barrier()
            shifted = tl.zeros([BLOCK_NF], dtype=tl.float32)
            for j in tl.static_range(2 * K + 1):
                # s_w[i] takes g_w[(i - (j - K)) mod N]; + K*N keeps the operand non-negative.
                source = (offs + K * N - (j - K)) % N
                neighbour = tl.load(scratch_row + h * N + source, mask=mask, other=0.0)
                shifted += tl.load(shift_row + h * (2 * K + 1) + j) * neighbour
        else:
            shifted = gated * tl.load(shift_row + h)
        gamma = tl.load(gamma_row + h)
        top = tl.max(shifted, axis=0)
        scaled = shifted / tl.where(top > 0, top, 1.0)
        positive = scaled > 0
        powered = tl.where(positive, tl.exp2(gamma * tl.log2(tl.where(positive, scaled, 1.0))), 0.0)
        weighting = powered / (tl.sum(powered, axis=0) + 1e-16)
        # Other threads may still be reading this head's scratch row or previous weights.
        tl.debug_barrier()
        tl.store(
            weights_slot + h * N + offs,
            weighting.to(weights_slot.dtype.element_ty),
            mask=mask,
        )
        tl.store(scratch_row + h * N + offs, weighting, mask=mask)


@triton.jit
def _read_write_tile(
    mem,
    mem_tile,
    offs_n,
    mask_n,
    offs_m,
    mask_m,
    reads_acc,
    scratch_row,
    erase_row,
    add_row,
    N: tl.constexpr,
    M: tl.constexpr,
    R: tl.constexpr,
    W: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """Phase C on one tile: add its share of every read, then erase/add-write it."""
    head_rows = tl.arange(0, R_PAD)
    for h in tl.static_range(R):
        weighting = tl.load(scratch_row + h * N + offs_n, mask=mask_n, other=0.0)
        part = tl.sum(weighting[:, None] * mem, axis=0)
        reads_acc += tl.where(head_rows[:, None] == h, part[None, :], 0.0)
    if W > 0:
        updated = mem
        for h in tl.static_range(W):
            weighting = tl.load(scratch_row + (R + h) * N + offs_n, mask=mask_n, other=0.0)
            erase = tl.load(erase_row + h * M + offs_m, mask=mask_m, other=0.0)
            updated = updated * (1.0 - weighting[:, None] * erase[None, :])
        for h in tl.static_range(W):
            weighting = tl.load(scratch_row + (R + h) * N + offs_n, mask=mask_n, other=0.0)
            add = tl.load(add_row + h * M + offs_m, mask=mask_m, other=0.0)
            updated += weighting[:, None] * add[None, :]
        tl.store(
            mem_tile,
            updated.to(mem_tile.dtype.element_ty),
            mask=mask_n[:, None] & mask_m[None, :],
        )
    return reads_acc


@triton.jit
def _store_reads(
    reads_row, reads, M: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr
):
    """One batch row's reads `[R, M]` (held as `[R_PAD, BLOCK_M]`) into the output."""
    head_rows = tl.arange(0, R_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    mask = (head_rows[:, None] < R) & (offs_m[None, :] < M)
    tl.store(reads_row + head_rows[:, None] * M + offs_m[None, :], reads, mask=mask)


@triton.jit
def ntm_step_kernel(
    memory_ptr,
    weights_ptr,
    slots_ptr,
    keys_ptr,
    beta_ptr,
    gate_ptr,
    shift_ptr,
    gamma_ptr,
    erase_ptr,
    add_ptr,
    reads_ptr,
    scratch_ptr,
    N: tl.constexpr,
    M: tl.constexpr,
    R: tl.constexpr,
    W: tl.constexpr,
    R_PAD: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_NF: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    H: tl.constexpr = R + W
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    if slot < 0:
        # A padding row: its reads are zeros (every row of the output is written); no slot
        # is read or written.
        reads = tl.zeros([R_PAD, BLOCK_M], dtype=tl.float32)
        _store_reads(reads_ptr + row * R * M, reads, M, R, R_PAD, BLOCK_M)
        return

    memory_slot = memory_ptr + slot * N * M
    weights_slot = weights_ptr + slot * H * N
    scratch_row = scratch_ptr + row * H * N
    keys_row = keys_ptr + row * H * M
    erase_row = erase_ptr + row * W * M
    add_row = add_ptr + row * W * M
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M

    if ONE_TILE:
        # The only tile: loaded here, kept in registers for phase C.
        offs_n, mask_n, mem_tile, mem = _load_tile(memory_slot, 0, offs_m, mask_m, N, M, BLOCK_N)
        _content_logits(
            mem, offs_n, mask_n, offs_m, mask_m, keys_row, beta_ptr + row * H,
            scratch_row, N, M, H,
        )  # fmt: skip
    else:
        for start in range(0, N, BLOCK_N):
            offs_n, mask_n, mem_tile, mem = _load_tile(
                memory_slot, start, offs_m, mask_m, N, M, BLOCK_N
            )
            _content_logits(
                mem, offs_n, mask_n, offs_m, mask_m, keys_row, beta_ptr + row * H,
                scratch_row, N, M, H,
            )  # fmt: skip
    tl.debug_barrier()

    _address_heads(
        scratch_row, weights_slot, gate_ptr + row * H, shift_ptr + row * H * (2 * K + 1),
        gamma_ptr + row * H, N, H, K, BLOCK_NF,
    )  # fmt: skip
    tl.debug_barrier()

    reads_acc = tl.zeros([R_PAD, BLOCK_M], dtype=tl.float32)
    if ONE_TILE:
        reads_acc = _read_write_tile(
            mem, mem_tile, offs_n, mask_n, offs_m, mask_m, reads_acc, scratch_row,
            erase_row, add_row, N, M, R, W, R_PAD,
        )  # fmt: skip
    else:
        for start in range(0, N, BLOCK_N):
            offs_n, mask_n, mem_tile, mem = _load_tile(
                memory_slot, start, offs_m, mask_m, N, M, BLOCK_N
            )
            reads_acc = _read_write_tile(
                mem, mem_tile, offs_n, mask_n, offs_m, mask_m, reads_acc, scratch_row,
                erase_row, add_row, N, M, R, W, R_PAD,
            )  # fmt: skip

    _store_reads(reads_ptr + row * R * M, reads_acc, M, R, R_PAD, BLOCK_M)
