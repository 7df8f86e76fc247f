"""Triton device code of the fused DNC memory step; `kernels.dnc` launches it.

The phases (A usage, B write content, C allocation and write weighting, D link and
precedence, E write and read content, F read weightings and reads) are described in
`kernels.dnc`. Triton reads TRITON_INTERPRET when these functions are defined.

Scratch row of one program (float32, `[(3 + 3R) * N]`): new usage, write content logits,
write weighting, then per read head the forward weightings f, backward weightings b and
read content logits. Values that other threads need in another layout go through it.
"""

import triton
import triton.language as tl


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _load_tile(
    memory_slot,
    start,
    offs_w,
    mask_w,
    N: tl.constexpr,
    W: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Rows start..start+BLOCK_ROWS of a slot's memory, as float32, with their addresses."""
    offs_n = start + tl.arange(0, BLOCK_ROWS)
    mask_n = offs_n < N
    mem_tile = memory_slot + offs_n[:, None] * W + offs_w[None, :]
    mem = tl.load(mem_tile, mask=mask_n[:, None] & mask_w[None, :], other=0.0)
    return offs_n, mask_n, mem_tile, mem.to(tl.float32)


@triton.jit
def _write_logits(mem, offs_n, mask_n, key, key_norm, strength, scratch_wl):
    """Phase B on one tile: strength * cos(write_key, mem[n]) into the scratch row."""
    row_norm = tl.sqrt(tl.sum(mem * mem, axis=1))
    dots = tl.sum(mem * key[None, :], axis=1)
    logits = strength * dots / (row_norm * key_norm + 1e-8)
    tl.store(scratch_wl + offs_n, logits, mask=mask_n)


@triton.jit
def _allocate_and_weight(
    scratch_u,
    scratch_wl,
    scratch_ww,
    write_weights_slot,
    allocation_gate,
    write_gate,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_LINK: tl.constexpr,
):
    """Phase C: allocation a, write content c^w and w^w = g^w (g^a a + (1 - g^a) c^w).

    a[j] = (1 - u[j]) prod_k {u[k] : k less used than j}, over tiles [BLOCK_LINK, BLOCK_N] of
    the "less used than" relation; a product is exact for zeros, and every row sees the same
    float32 usage (one scratch copy), so ties resolve consistently by index.
    """
    offs_k = tl.arange(0, BLOCK_N)
    mask_k = offs_k < N
    usage_k = tl.load(scratch_u + offs_k, mask=mask_k, other=1.0)
    logits = tl.load(scratch_wl + offs_k, mask=mask_k, other=float("-inf"))
    peak = tl.max(logits, axis=0)
    inv_denom = 1.0 / tl.sum(tl.exp(logits - peak), axis=0)
    for start in range(0, N, BLOCK_LINK):
        offs_j = start + tl.arange(0, BLOCK_LINK)
        mask_j = offs_j < N
        usage_j = tl.load(scratch_u + offs_j, mask=mask_j, other=0.0)
        less_used = (usage_k[None, :] < usage_j[:, None]) | (
            (usage_k[None, :] == usage_j[:, None]) & (offs_k[None, :] < offs_j[:, None])
        )
        factors = tl.where(less_used & mask_k[None, :], usage_k[None, :], 1.0)
        allocation = (1.0 - usage_j) * tl.reduce(factors, 1, _multiply)
        content = tl.exp(tl.load(scratch_wl + offs_j, mask=mask_j, other=0.0) - peak) * inv_denom
        weights = write_gate * (allocation_gate * allocation + (1.0 - allocation_gate) * content)
        tl.store(scratch_ww + offs_j, weights, mask=mask_j)
        tl.store(
            write_weights_slot + offs_j,
            weights.to(write_weights_slot.dtype.element_ty),
            mask=mask_j,
        )


@triton.jit
def _update_link(
    link_slot,
    precedence_slot,
    read_weights_slot,
    scratch_ww,
    scratch_f,
    scratch_b,
    N: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_LINK: tl.constexpr,
):
    """Phase D: one pass over the link matrix in row blocks [BLOCK_LINK, BLOCK_N].

    Each block is updated, stored, and used at once for the forward weightings of its rows
    (f[r, i] = sum_j L[i, j] w^r[r, j], complete per block) and a block's share of the
    backward weightings (b[r, j] = sum_i L[i, j] w^r[r, i], accumulated over blocks).
    """
    offs_j = tl.arange(0, BLOCK_N)
    mask_j = offs_j < N
    weights_j = tl.load(scratch_ww + offs_j, mask=mask_j, other=0.0)
    precedence_j = tl.load(precedence_slot + offs_j, mask=mask_j, other=0.0).to(tl.float32)
    heads = tl.arange(0, R_PAD)
    backward = tl.zeros([R_PAD, BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_LINK):
        offs_i = start + tl.arange(0, BLOCK_LINK)
        mask_i = offs_i < N
        tile = link_slot + offs_i[:, None] * N + offs_j[None, :]
        tile_mask = mask_i[:, None] & mask_j[None, :]
        link = tl.load(tile, mask=tile_mask, other=0.0).to(tl.float32)
        weights_i = tl.load(scratch_ww + offs_i, mask=mask_i, other=0.0)
        link = (1.0 - weights_i[:, None] - weights_j[None, :]) * link + (
            weights_i[:, None] * precedence_j[None, :]
        )
        link = tl.where(offs_i[:, None] == offs_j[None, :], 0.0, link)
        tl.debug_barrier()  # the whole block is loaded before any of it is replaced
        tl.store(tile, link.to(link_slot.dtype.element_ty), mask=tile_mask)
        for r in tl.static_range(R):
            read_j = tl.load(read_weights_slot + r * N + offs_j, mask=mask_j, other=0.0)
            forward = tl.sum(link * read_j.to(tl.float32)[None, :], axis=1)
            tl.store(scratch_f + r * N + offs_i, forward, mask=mask_i)
            read_i = tl.load(read_weights_slot + r * N + offs_i, mask=mask_i, other=0.0)
            part = tl.sum(link * read_i.to(tl.float32)[:, None], axis=0)
            backward += tl.where(heads[:, None] == r, part[None, :], 0.0)
    tl.store(
        scratch_b + heads[:, None] * N + offs_j[None, :],
        backward,
        mask=(heads[:, None] < R) & mask_j[None, :],
    )
    # Every thread has read the old precedence before it is replaced.
    tl.debug_barrier()
    total = tl.sum(weights_j, axis=0)
    tl.store(
        precedence_slot + offs_j,
        ((1.0 - total) * precedence_j + weights_j).to(precedence_slot.dtype.element_ty),
        mask=mask_j,
    )


@triton.jit
def _write_and_read_tile(
    mem,
    mem_tile,
    offs_n,
    mask_n,
    offs_w,
    mask_w,
    scratch_ww,
    scratch_f,
    scratch_b,
    scratch_rl,
    erase,
    write_vector,
    read_keys_row,
    read_strengths_row,
    read_modes_ptr,
    row,
    run_max,
    run_sum,
    acc_content,
    acc_link,
    N: tl.constexpr,
    W: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_LINK: tl.constexpr,
):
    """Phase E on one tile: write it, then accumulate every read head's share of the reads.

    The content part of a read is a softmax over all N rows; it is accumulated online (a
    running maximum rescales the running sum and the weighted rows, as in flash attention),
    so the written tile is read from registers and never reloaded. The link part
    pi[0] b + pi[2] f is known from phase D and accumulates directly.
    """
    weights = tl.load(scratch_ww + offs_n, mask=mask_n, other=0.0)
    mem = mem * (1.0 - weights[:, None] * erase[None, :]) + weights[:, None] * write_vector[None, :]
    tl.debug_barrier()  # a tile smaller than the thread count is replicated: load all first
    tl.store(mem_tile, mem.to(mem_tile.dtype.element_ty), mask=mask_n[:, None] & mask_w[None, :])
    row_norm = tl.sqrt(tl.sum(mem * mem, axis=1))
    heads = tl.arange(0, R_PAD)
    for r in tl.static_range(R):
        key = tl.load(read_keys_row + r * W + offs_w, mask=mask_w, other=0.0)
        key_norm = tl.sqrt(tl.sum(key * key, axis=0))
        strength = tl.load(read_strengths_row + r)
        logits = strength * tl.sum(mem * key[None, :], axis=1) / (row_norm * key_norm + 1e-8)
        tl.store(scratch_rl + r * N + offs_n, logits, mask=mask_n)
        logits = tl.where(mask_n, logits, float("-inf"))
        is_head = heads == r
        old_max = tl.max(tl.where(is_head, run_max, float("-inf")), axis=0)
        new_max = tl.maximum(old_max, tl.max(logits, axis=0))
        rescale = tl.exp(old_max - new_max)
        probs = tl.exp(logits - new_max)
        run_max = tl.where(is_head, new_max, run_max)
        run_sum = tl.where(is_head, run_sum * rescale + tl.sum(probs, axis=0), run_sum)
        rows = tl.sum(probs[:, None] * mem, axis=0)
        acc_content = tl.where(is_head[:, None], acc_content * rescale + rows[None, :], acc_content)
        if HAS_LINK:
            backward = tl.load(scratch_b + r * N + offs_n, mask=mask_n, other=0.0)
            forward = tl.load(scratch_f + r * N + offs_n, mask=mask_n, other=0.0)
            modes_row = read_modes_ptr + row * R * 3  # only here: None without links
            mode_b = tl.load(modes_row + r * 3)
            mode_f = tl.load(modes_row + r * 3 + 2)
            located = mode_b * backward + mode_f * forward
            acc_link += tl.where(
                is_head[:, None], tl.sum(located[:, None] * mem, axis=0)[None, :], 0.0
            )
    return run_max, run_sum, acc_content, acc_link


@triton.jit
def _read_weightings(
    read_weights_slot,
    scratch_rl,
    scratch_f,
    scratch_b,
    read_modes_ptr,
    row,
    N: tl.constexpr,
    R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LINK: tl.constexpr,
):
    """Phase F: w^r = pi[0] b + pi[1] softmax(logits) + pi[2] f into the pool."""
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    for r in tl.static_range(R):
        logits = tl.load(scratch_rl + r * N + offs, mask=mask, other=float("-inf"))
        peak = tl.max(logits, axis=0)
        content = tl.exp(logits - peak)
        weights = content / tl.sum(content, axis=0)
        if HAS_LINK:
            backward = tl.load(scratch_b + r * N + offs, mask=mask, other=0.0)
            forward = tl.load(scratch_f + r * N + offs, mask=mask, other=0.0)
            modes_row = read_modes_ptr + row * R * 3  # only here: None without links
            mode_b = tl.load(modes_row + r * 3)
            mode_c = tl.load(modes_row + r * 3 + 1)
            mode_f = tl.load(modes_row + r * 3 + 2)
            weights = mode_b * backward + mode_c * weights + mode_f * forward
        tl.store(
            read_weights_slot + r * N + offs,
            weights.to(read_weights_slot.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _store_reads(
    reads_row, reads, W: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_W: tl.constexpr
):
    """One batch row's reads `[R, W]` (held as `[R_PAD, BLOCK_W]`) into the output."""
    heads = tl.arange(0, R_PAD)
    offs_w = tl.arange(0, BLOCK_W)
    mask = (heads[:, None] < R) & (offs_w[None, :] < W)
    tl.store(reads_row + heads[:, None] * W + offs_w[None, :], reads, mask=mask)


@triton.heuristics({"HAS_LINK": lambda args: args["link_ptr"] is not None})
@triton.jit
def dnc_step_kernel(
    memory_ptr,
    usage_ptr,
    precedence_ptr,
    link_ptr,
    write_weights_ptr,
    read_weights_ptr,
    slots_ptr,
    read_keys_ptr,
    read_strengths_ptr,
    write_key_ptr,
    write_strength_ptr,
    erase_ptr,
    write_vector_ptr,
    free_gates_ptr,
    allocation_gate_ptr,
    write_gate_ptr,
    read_modes_ptr,
    reads_ptr,
    scratch_ptr,
    N: tl.constexpr,
    W: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_LINK: tl.constexpr,
    ONE_TILE: tl.constexpr,
    HAS_LINK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    if slot < 0:
        # A padding row: its reads are zeros (every row of the output is written); no slot
        # is read or written.
        reads = tl.zeros([R_PAD, BLOCK_W], dtype=tl.float32)
        _store_reads(reads_ptr + row * R * W, reads, W, R, R_PAD, BLOCK_W)
        return

    memory_slot = memory_ptr + slot * N * W
    read_weights_slot = read_weights_ptr + slot * R * N
    scratch_u = scratch_ptr + row * (3 + 3 * R) * N
    scratch_wl = scratch_u + N
    scratch_ww = scratch_u + 2 * N
    scratch_f = scratch_u + 3 * N
    scratch_b = scratch_f + R * N
    scratch_rl = scratch_b + R * N
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    offs_w = tl.arange(0, BLOCK_W)
    mask_w = offs_w < W

    # A: retention psi = prod_r (1 - f_r w^r_r) and usage u = (u + w^w - u w^w) psi.
    usage = tl.load(usage_ptr + slot * N + offs, mask=mask, other=0.0).to(tl.float32)
    written = tl.load(write_weights_ptr + slot * N + offs, mask=mask, other=0.0).to(tl.float32)
    psi = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    for r in tl.static_range(R):
        free_gate = tl.load(free_gates_ptr + row * R + r)
        read = tl.load(read_weights_slot + r * N + offs, mask=mask, other=0.0).to(tl.float32)
        psi = psi * (1.0 - free_gate * read)
    usage = (usage + written - usage * written) * psi
    tl.store(scratch_u + offs, usage, mask=mask)

    # B: write content logits against the memory before the write.
    key = tl.load(write_key_ptr + row * W + offs_w, mask=mask_w, other=0.0)
    key_norm = tl.sqrt(tl.sum(key * key, axis=0))
    strength = tl.load(write_strength_ptr + row)
    if ONE_TILE:
        # The only tile: loaded here, kept in registers for phase E.
        offs_n, mask_n, mem_tile, mem = _load_tile(memory_slot, 0, offs_w, mask_w, N, W, BLOCK_ROWS)
        _write_logits(mem, offs_n, mask_n, key, key_norm, strength, scratch_wl)
    else:
        for start in range(0, N, BLOCK_ROWS):
            offs_n, mask_n, mem_tile, mem = _load_tile(
                memory_slot, start, offs_w, mask_w, N, W, BLOCK_ROWS
            )
            _write_logits(mem, offs_n, mask_n, key, key_norm, strength, scratch_wl)
    tl.debug_barrier()
    # Stored only now: with few rows, several threads hold one element (a replicated layout),
    # and a thread must not replace a value another one has yet to load.
    tl.store(usage_ptr + slot * N + offs, usage.to(usage_ptr.dtype.element_ty), mask=mask)

    # C: allocation from the new usage, write weighting (pool and scratch).
    allocation_gate = tl.load(allocation_gate_ptr + row)
    write_gate = tl.load(write_gate_ptr + row)
    _allocate_and_weight(
        scratch_u, scratch_wl, scratch_ww, write_weights_ptr + slot * N, allocation_gate,
        write_gate, N, BLOCK_N, BLOCK_LINK,
    )  # fmt: skip
    tl.debug_barrier()

    # D: link matrix, forward and backward weightings, precedence.
    if HAS_LINK:
        _update_link(
            link_ptr + slot * N * N, precedence_ptr + slot * N, read_weights_slot, scratch_ww,
            scratch_f, scratch_b, N, R, R_PAD, BLOCK_N, BLOCK_LINK,
        )  # fmt: skip
        tl.debug_barrier()

    # E: write the memory, read content logits and the reads' running sums.
    erase = tl.load(erase_ptr + row * W + offs_w, mask=mask_w, other=0.0)
    write_vector = tl.load(write_vector_ptr + row * W + offs_w, mask=mask_w, other=0.0)
    run_max = tl.full([R_PAD], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([R_PAD], dtype=tl.float32)
    acc_content = tl.zeros([R_PAD, BLOCK_W], dtype=tl.float32)
    acc_link = tl.zeros([R_PAD, BLOCK_W], dtype=tl.float32)
    if ONE_TILE:
        run_max, run_sum, acc_content, acc_link = _write_and_read_tile(
            mem, mem_tile, offs_n, mask_n, offs_w, mask_w, scratch_ww, scratch_f, scratch_b,
            scratch_rl, erase, write_vector, read_keys_ptr + row * R * W,
            read_strengths_ptr + row * R, read_modes_ptr, row, run_max, run_sum,
            acc_content, acc_link, N, W, R, R_PAD, HAS_LINK,
        )  # fmt: skip
    else:
        for start in range(0, N, BLOCK_ROWS):
            offs_n, mask_n, mem_tile, mem = _load_tile(
                memory_slot, start, offs_w, mask_w, N, W, BLOCK_ROWS
            )
            run_max, run_sum, acc_content, acc_link = _write_and_read_tile(
                mem, mem_tile, offs_n, mask_n, offs_w, mask_w, scratch_ww, scratch_f,
                scratch_b, scratch_rl, erase, write_vector, read_keys_ptr + row * R * W,
                read_strengths_ptr + row * R, read_modes_ptr, row, run_max, run_sum,
                acc_content, acc_link, N, W, R, R_PAD, HAS_LINK,
            )  # fmt: skip
    tl.debug_barrier()

    # F: read weightings into the pool; reads = pi[1] content part + link part.
    _read_weightings(
        read_weights_slot, scratch_rl, scratch_f, scratch_b, read_modes_ptr, row, N, R,
        BLOCK_N, HAS_LINK,
    )  # fmt: skip
    heads = tl.arange(0, R_PAD)
    head_ok = heads < R
    reads = acc_content / tl.where(head_ok, run_sum, 1.0)[:, None]
    if HAS_LINK:
        mode_c = tl.load(read_modes_ptr + row * R * 3 + heads * 3 + 1, mask=head_ok, other=0.0)
        reads = mode_c[:, None] * reads + acc_link
    _store_reads(reads_ptr + row * R * W, reads, W, R, R_PAD, BLOCK_W)
