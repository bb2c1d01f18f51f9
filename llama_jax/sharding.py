"""The one place where logical axis names meet the device mesh.

Parameters and activations name their dimensions logically (`embed`, `heads`, ...); the rules
table in the config maps each name to mesh axes. Changing the table or the mesh never touches
model code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax.config import MESH_AXES, Config, MeshConfig
from llama_jax.errors import ConfigError, LlamaJaxError

Rules = Mapping[str, Sequence[str]]


# ---------------------------------------------------------------------------------------------
# Mesh


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, tuple[int, int]]:
    """(ici, dcn) size per mesh axis, with a `-1` axis filled from the device count."""
    ici = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
    dcn = {a: getattr(mesh_cfg, f"dcn_{a}") for a in MESH_AXES}
    known = math.prod(s for s in ici.values() if s != -1) * math.prod(dcn.values())
    for axis, size in ici.items():
        if size == -1:
            if num_devices % known:
                raise ConfigError(
                    f"mesh.{axis}=-1 cannot be filled: the other axes multiply to {known}, "
                    f"which does not divide the {num_devices} devices"
                )
            ici[axis] = num_devices // known
    total = math.prod(ici[a] * dcn[a] for a in MESH_AXES)
    if total != num_devices:
        layout = " x ".join(f"{a}={ici[a] * dcn[a]}" for a in MESH_AXES)
        raise ConfigError(f"mesh {layout} = {total} devices, but {num_devices} are available")
    return {a: (ici[a], dcn[a]) for a in MESH_AXES}


def _axes_per_dimension(names: Sequence[str], rules: Rules) -> dict[str, list[str]]:
    """The mesh axes `mesh.rules` gives each dimension of one array, first come first served
    (as `logical_to_spec` assigns them, before sizes are looked at)."""
    used: set[str] = set()
    out = {}
    for name in names:
        out[name] = [a for a in rules.get(name, ()) if a not in used]
        used.update(out[name])
    return out


def check_divisibility(cfg: Config, sizes: Mapping[str, int]) -> None:
    """Refuse a layout that cannot split the attention activations or the batch, naming axis
    and numbers. Which axes split what comes from `mesh.rules`, as the model will apply them
    to its [batch, length, heads, head_dim] activations."""
    m, rules = cfg.model, cfg.mesh.rules
    micro = cfg.train.global_batch_size // cfg.train.microbatches
    batch = f"train.global_batch_size={cfg.train.global_batch_size}"
    if cfg.train.microbatches > 1:
        batch = f"the microbatch of {micro} sequences ({batch} / train.microbatches)"
    q_axes = _axes_per_dimension(("batch", "length", "heads"), rules)
    kv_axes = _axes_per_dimension(("batch", "length", "kv_heads"), rules)
    for axes, count, what in ((q_axes["heads"], m.num_heads, f"model.num_heads={m.num_heads}"),
                              (kv_axes["kv_heads"], m.kv_heads,
                               f"model.num_kv_heads={m.kv_heads}"),
                              (q_axes["batch"], micro, batch),
                              (q_axes["length"], cfg.data.seq_len,
                               f"data.seq_len={cfg.data.seq_len}")):
        split = math.prod(sizes[a] for a in axes)
        if count % split:
            layout = (f"mesh.{axes[0]}={split}" if len(axes) == 1 else
                      f"mesh {' x '.join(axes)} = {' x '.join(str(sizes[a]) for a in axes)} "
                      f"= {split}")
            raise ConfigError(f"{layout} does not divide {what}")
    split = math.prod(sizes[a] for a in q_axes["length"])
    if split > 1:  # context parallelism (context_parallel.py)
        where = f"the sequence split {split} ways (mesh {' x '.join(q_axes['length'])})"
        if cfg.data.seq_len % (2 * split):
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} does not divide into 2 x {split} "
                              f"equal chunks for {where}: each device holds a front and a back "
                              f"chunk, to balance causal attention")
        if m.attention == "cudnn":
            raise ConfigError(f"model.attention=cudnn cannot attend across {where}: JAX's cuDNN "
                              f"attention takes no key positions; use model.attention=xla "
                              f"(context parallelism runs the blocked kernels either way)")


def make_mesh(cfg: Config, devices: Sequence[Any] | None = None) -> Mesh:
    """The device mesh of the config; DCN factors make a hybrid mesh with slow links outermost."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg.mesh, len(devices))
    sizes = {a: ici * dcn for a, (ici, dcn) in shape.items()}
    check_divisibility(cfg, sizes)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    on_tpu = devices[0].platform == "tpu"
    dcn_total = math.prod(dcn for _, dcn in shape.values())
    slices = len({getattr(d, "slice_index", 0) for d in devices}) if on_tpu else 1
    if slices > 1 and dcn_total == 1:
        raise ConfigError(f"the devices come from {slices} TPU slices joined by the data-center "
                          f"network: say which mesh axis spans them, e.g. mesh.dcn_data={slices}")
    if dcn_total > 1:
        from jax.experimental import mesh_utils

        granules = len({getattr(d, "slice_index", 0) if on_tpu else d.process_index
                        for d in devices})
        if granules != dcn_total:
            kind = "slices" if on_tpu else "processes"
            raise ConfigError(
                f"mesh dcn_* factors multiply to {dcn_total}, but the devices come from "
                f"{granules} {kind}"
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            [shape[a][0] for a in MESH_AXES], [shape[a][1] for a in MESH_AXES], devices,
            process_is_granule=not on_tpu,
        )
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh([sizes[a] for a in MESH_AXES], MESH_AXES, axis_types=axis_types,
                         devices=devices)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))


# ---------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Map logical dimension names to mesh axes.

    A mesh axis is used at most once per array (the first dimension that asks gets it, so an
    activation's `batch` takes `fsdp` before its `embed` can); axes of size 1 are left out; and
    where `shape` is given, an axis that does not divide its dimension is dropped (that
    dimension is replicated instead, which `replicated_fraction` reports).
    """
    sizes = mesh_sizes(mesh)
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(names):
        axes = []
        dim = None if shape is None else shape[i]
        for axis in rules.get(name, ()) if name else ():
            if axis in used or sizes.get(axis, 1) == 1:
                continue
            if dim is not None and dim % (math.prod(sizes[a] for a in axes) * sizes[axis]):
                continue
            axes.append(axis)
            used.add(axis)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _logical_axes(leaf: Any) -> tuple[str, ...] | None:
    meta = leaf.get_metadata() if hasattr(leaf, "get_metadata") else {}
    return meta.get("logical_axes")


def _is_variable(x: Any) -> bool:
    return hasattr(x, "get_metadata")


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding for every Variable of an (abstract) NNX state, from its logical names."""

    def one(leaf: Any) -> Any:
        names = _logical_axes(leaf) or ()
        shape = leaf.get_value().shape
        return leaf.replace(NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape)))

    return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def train_state_shardings(abstract_vars: Any, tx: optax.GradientTransformation,
                          abstract_opt: Any, mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """Shardings of the train state's {"step", "params", "opt_state"}: parameters by their
    logical names, each optimizer moment like its parameter, counters replicated."""
    params = nnx.to_pure_dict(state_shardings(abstract_vars, mesh, rules))
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params,
                                transform_non_params=lambda _: replicated(mesh))
    return {"step": replicated(mesh), "params": params, "opt_state": opt}


def replicated_fraction(abstract_state: Any, mesh: Mesh, rules: Rules) -> tuple[float, list[str]]:
    """Share of parameter bytes stored whole on every device, and the names of such leaves."""
    total, replicated, names = 0, 0, []
    for path, leaf in nnx.to_flat_state(abstract_state):
        value = leaf.get_value()
        nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
        total += nbytes
        spec = logical_to_spec(_logical_axes(leaf) or (), rules, mesh, value.shape)
        if all(s is None for s in spec):
            replicated += nbytes
            names.append("/".join(str(p) for p in path))
    return (replicated / total if total else 0.0), names


# ---------------------------------------------------------------------------------------------
# Activation constraints


_ACTIVE: list[tuple[Mesh, Rules] | None] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules | None = None) -> Iterator[None]:
    """Every model call runs inside this (train, eval, generate, api): with a mesh, `constrain`
    pins activations to it by `rules`; with None, the caller declares the call unsharded."""
    _ACTIVE.append(None if mesh is None else (mesh, rules or {}))
    try:
        yield
    finally:
        _ACTIVE.pop()


def unsharded() -> contextlib.AbstractContextManager[None]:
    """A model call that shards nothing: activations go where XLA puts them."""
    return activation_sharding(None)


def _active() -> tuple[Mesh, Rules] | None:
    """The mesh and rules activations follow now. Outside `activation_sharding` on more than
    one device a constraint would do nothing without a word, so that is refused."""
    if _ACTIVE:
        return _ACTIVE[-1]
    if jax.device_count() > 1:
        raise LlamaJaxError(
            f"the model was called outside sharding.activation_sharding on "
            f"{jax.device_count()} devices, where its activation constraints would do "
            f"nothing: enter activation_sharding(mesh, rules), or sharding.unsharded() to "
            f"shard nothing")
    return None


def active_mesh() -> tuple[Mesh, Rules]:
    """The mesh and rules of the enclosing `activation_sharding` (one with a mesh)."""
    active = _active()
    if active is None:
        raise LlamaJaxError("no mesh is active: the caller shards nothing")
    return active


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation by logical names (nothing to do in an unsharded call)."""
    active = _active()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def is_sharded(name: str) -> bool:
    """Whether activations' logical dimension `name` is split over devices right now."""
    active = _active()
    if active is None:
        return False
    mesh, rules = active
    sizes = mesh_sizes(mesh)
    return any(sizes.get(axis, 1) > 1 for axis in rules.get(name, ()))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] input array."""
    names = ("batch", "length") + (None,) * (ndim - 2)
    return NamedSharding(mesh, logical_to_spec(names[:ndim], rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
