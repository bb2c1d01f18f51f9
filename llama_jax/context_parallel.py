"""Context parallelism: attention when the sequence is split over `mesh.sequence`.

Each device holds a slice of every row's positions. Attention needs every earlier key, so the
keys and values travel, in one of two ways (`model.context_parallel`):

- `all_gather`: each layer gathers K and V over the sequence axis, then attends the local
  queries to all of them (`ops.flash_attention`, skipping block pairs with nothing visible).
  Simple, one collective per layer (whose gradient is a reduce-scatter); holds the full K and
  V of a layer.
- `ring`: K and V blocks pass around the sequence axis with `ppermute`; each step attends
  the local queries to the block at hand and merges the result by log-sum-exp (online
  softmax), in a loop that holds one block at hand and one in flight. The next block's
  transfer does not depend on the current step's compute, so XLA can overlap them. The
  backward sends the blocks around again, with their gradients travelling along, and uses the
  final log-sum-exp (FlashAttention's backward), so nothing of size T x T is stored.

Causality comes from the tokens' positions and document ids, not from their order, so the
rows can be laid out for balance: `balanced_order` gives device j the chunks j and 2s-1-j of
the 2s chunks of a row, so every device has the same number of unmasked query-key pairs
(under plain contiguous slices the last device would do 2s-1 times the first one's work).
The step applies that order to the whole batch before the model; every other layer is
per-token and the loss is a sum, so nothing else notices.

Both kinds run inside `jax.shard_map` over the mesh (manual on every axis), the attention
kernels are `ops.flash_forward` / `flash_backward` (block pairs, online softmax, loops whose
size does not grow with T), and grouped-query heads are never repeated.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from llama_jax import ops, sharding

Array = jax.Array
F32 = jnp.float32


def balanced_order(t: int, shards: int) -> np.ndarray:
    """The permutation of a row's T positions that gives sequence shard j the chunks j and
    2s-1-j of 2s equal chunks (T must divide by 2s)."""
    chunk = t // (2 * shards)
    order = []
    for j in range(shards):
        order += [np.arange(j * chunk, (j + 1) * chunk),
                  np.arange((2 * shards - 1 - j) * chunk, (2 * shards - j) * chunk)]
    return np.concatenate(order)


def unmasked_blocks(order: np.ndarray, shards: int, block: int) -> list[int]:
    """Per sequence shard: how many (query block, key block) pairs of `block` positions hold
    at least one causal (key <= query) pair, under the row layout `order`. What balance
    means: the same count on every shard."""
    t = len(order)
    local = t // shards
    counts = []
    for j in range(shards):
        queries = order[j * local:(j + 1) * local]
        n = 0
        for q0 in range(0, local, block):
            q_max = queries[q0:q0 + block].max()
            n += sum(1 for k0 in range(0, t, block) if k0 <= q_max)
        counts.append(n)
    return counts


def sequence_axes(mesh: Mesh, rules: sharding.Rules) -> tuple[str, ...]:
    sizes = sharding.mesh_sizes(mesh)
    return tuple(a for a in rules.get("length", ()) if sizes.get(a, 1) > 1)


def sequence_shards(mesh: Mesh, rules: sharding.Rules) -> int:
    sizes = sharding.mesh_sizes(mesh)
    return int(np.prod([sizes[a] for a in sequence_axes(mesh, rules)], dtype=int))


# ---------------------------------------------------------------------------------------------
# all_gather: the local queries against the gathered keys


def _all_gather_local(axes: tuple[str, ...], block: int, q: Array, k: Array, v: Array,
                      pos: Array, seg: Array | None) -> Array:
    def gather(a: Array, axis: int) -> Array:
        return jax.lax.all_gather(a, axes, axis=axis, tiled=True)

    seg_all = None if seg is None else gather(seg, 1)
    return ops.flash_attention(q, gather(k, 2), gather(v, 2), pos, gather(pos, 1), seg, seg_all,
                               block)


# ---------------------------------------------------------------------------------------------
# ring: key/value blocks passed around the sequence axis


def _ring_perm(axes: tuple[str, ...], mesh_sizes: dict[str, int]) -> list[tuple[int, int]]:
    n = int(np.prod([mesh_sizes[a] for a in axes]))
    return [(i, (i + 1) % n) for i in range(n)]


def _hop(axes: tuple[str, ...], perm: tuple[tuple[int, int], ...], tree: object) -> object:
    return jax.tree.map(lambda a: jax.lax.ppermute(a, axes, list(perm)), tree)


def _around_ring(axes: tuple[str, ...], perm: tuple[tuple[int, int], ...], kv: tuple,
                 carry: tuple, visit) -> tuple:
    """Visits each device's K/V block once, the local one first: `visit(kv, carry)` per block.
    A `fori_loop`, not unrolled hops, so one block is in flight and one at hand whatever the
    ring's length (unrolled, XLA kept every hop's block alive: 2.4 GiB more than gathering K/V
    for Llama 3 8B at 32k). The next block's transfer is issued before the visit and does not
    depend on it, so the two overlap; n blocks take n-1 hops."""
    def body(_: Array, state: tuple) -> tuple:
        here, acc = state
        return _hop(axes, perm, here), visit(here, acc)

    kv, carry = jax.lax.fori_loop(0, len(perm) - 1, body, (kv, carry))
    return visit(kv, carry)


def _ring_forward(axes: tuple[str, ...], perm: tuple[tuple[int, int], ...], block: int,
                  q: Array, k: Array, v: Array, pos: Array, seg: Array | None
                  ) -> tuple[Array, Array]:
    """The float32 output and log-sum-exp of the local queries over every block: each visit
    goes on with the online softmax of the blocks before."""
    def visit(kv: tuple, acc: tuple[Array, Array]) -> tuple[Array, Array]:
        return ops.flash_forward(q, kv[0], kv[1], pos, kv[2], seg, kv[3], block, acc)

    init = (jnp.zeros(q.shape, F32), jnp.full(q.shape[:-1] + (1,), ops.NEG, F32))
    return _around_ring(axes, perm, (k, v, pos, seg), init, visit)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(axes: tuple[str, ...], perm: tuple[tuple[int, int], ...], block: int, q: Array,
          k: Array, v: Array, pos: Array, seg: Array | None) -> Array:
    out, _ = _ring_forward(axes, perm, block, q, k, v, pos, seg)
    return out.astype(q.dtype)


def _ring_fwd(axes: tuple[str, ...], perm: tuple[tuple[int, int], ...], block: int, q: Array,
              k: Array, v: Array, pos: Array, seg: Array | None
              ) -> tuple[Array, tuple[Array | None, ...]]:
    out, lse = _ring_forward(axes, perm, block, q, k, v, pos, seg)
    out = out.astype(q.dtype)
    return out, (q, k, v, pos, seg, out, lse)


def _ring_bwd(axes: tuple[str, ...], perm: tuple[tuple[int, int], ...], block: int,
              res: tuple[Array | None, ...], d_out: Array) -> tuple[Array | None, ...]:
    """Blocks go around once more (FlashAttention's backward from the final log-sum-exp);
    each block's K/V gradient travels with it, one hop per visit, and is home after the
    last."""
    q, k, v, pos, seg, out, lse = res

    def visit(kv: tuple, acc: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        dq, dk, dv = ops.flash_backward(q, kv[0], kv[1], pos, kv[2], seg, kv[3], out, lse,
                                        d_out, block, acc)
        return (dq, *_hop(axes, perm, (dk, dv)))

    init = (jnp.zeros(q.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    dq, dk, dv = _around_ring(axes, perm, (k, v, pos, seg), init, visit)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------------------------
# Entry


def attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, positions_BxT: Array,
              segment_ids_BxT: Array | None, *, kind: str, scale: float, block: int) -> Array:
    """Causal attention (within documents) when `length` is split over devices."""
    mesh, rules = sharding.active_mesh()
    axes = sequence_axes(mesh, rules)
    q_spec = sharding.logical_to_spec(("batch", "length", "heads", None), rules, mesh,
                                      q_BxTxNxH.shape)
    kv_spec = sharding.logical_to_spec(("batch", "length", "kv_heads", None), rules, mesh,
                                       k_BxTxKxH.shape)
    if _entry(q_spec, 2) != _entry(kv_spec, 2):  # heads split unlike kv heads: keep both whole
        q_spec = PartitionSpec(_entry(q_spec, 0), _entry(q_spec, 1))
        kv_spec = PartitionSpec(_entry(kv_spec, 0), _entry(kv_spec, 1))
    row_spec = PartitionSpec(_entry(q_spec, 0), _entry(q_spec, 1))
    if _entry(kv_spec, 0) != _entry(q_spec, 0) or _entry(kv_spec, 1) != _entry(q_spec, 1):
        raise ValueError(f"context parallelism: queries {q_spec} and keys {kv_spec} are split "
                         f"differently along batch or length")

    def local(q: Array, k: Array, v: Array, pos: Array, seg: Array | None) -> Array:
        qh, kh, vh = ops.to_head_major(q, k, v, scale)
        if kind == "ring":
            perm = tuple(_ring_perm(axes, sharding.mesh_sizes(mesh)))
            out = _ring(axes, perm, block, qh, kh, vh, pos, seg)
        else:
            out = _all_gather_local(axes, block, qh, kh, vh, pos, seg)
        return ops.from_head_major(out)

    specs = (q_spec, kv_spec, kv_spec, row_spec, None if segment_ids_BxT is None else row_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT)


def _entry(spec: PartitionSpec, i: int) -> str | Sequence[str] | None:
    return spec[i] if i < len(spec) else None
