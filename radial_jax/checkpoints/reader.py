"""``CheckpointReader``: lazy, name-mapped access to a Hugging Face checkpoint or a GGUF file, one layer (or one
device's slice) at a time."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from radial_jax.checkpoints.errors import CheckpointError
from radial_jax.checkpoints.gguf import GGUFCheckpoint
from radial_jax.checkpoints.hub import read_json, resolve_checkpoint, resolve_gguf
from radial_jax.checkpoints.tensor_files import SafetensorsTensor, safetensors_tensors, torch_tensors
from radial_jax.models.bundle import Model, example_inputs
from radial_jax.models.family import config_from_hf, family_of, module_for, resolve_dtype
from radial_jax.models.names import convert
from radial_jax.scale.sharding import AXIS_RULES, fit_spec, logical_specs


class CheckpointReader:
    """Lazy, name-mapped access to a checkpoint: a directory in hub layout, or a GGUF file.

    ``gguf_file``: read that GGUF file of the directory (or hub repo) instead of its
    safetensors, as transformers' ``gguf_file=`` does; a path ending in ``.gguf`` is
    read as GGUF too (``radial_jax.checkpoints.gguf``: metadata to config, tensors dequantized).
    ``config_kwargs`` go to the family config's ``from_hf`` (ViT: ``with_classifier``).
    """

    def __init__(self, name_or_path: str, *, gguf_file: Optional[str] = None, **config_kwargs):
        gguf_path = resolve_gguf(name_or_path, gguf_file)
        if gguf_path is not None:
            self.gguf = GGUFCheckpoint(gguf_path)
            self.path, self.source = gguf_path.parent, gguf_path
            self.hf_config = self.gguf.hf_config
        else:
            self.gguf = None
            self.path = resolve_checkpoint(name_or_path)
            self.source = self.path / "config.json"
            self.hf_config = read_json(self.source, "model configuration")
        kwargs = {k: v for k, v in config_kwargs.items() if v is not None}
        try:
            self.config = config_from_hf(self.hf_config, **kwargs)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.source}: {e}") from e
        self.family = family_of(self.config)
        self.names = self.family.names
        raw = self.gguf.tensor_readers() if self.gguf is not None else self._tensor_readers()
        self._readers = {self.names.normalise(k): v for k, v in raw.items()}
        self._expected = self._expected_shapes()

    def _tensor_readers(self):
        p = self.path
        if (p / "model.safetensors.index.json").exists():
            index = read_json(p / "model.safetensors.index.json", "shard index")
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{p / 'model.safetensors.index.json'} has no 'weight_map' object")
            shards = sorted(set(index["weight_map"].values()))
            readers = {}
            for shard in shards:
                if not (p / shard).exists():
                    raise CheckpointError(f"{p} lists shard {shard} in model.safetensors.index.json but it is missing")
                readers.update(safetensors_tensors(p / shard))
            return readers
        if (p / "model.safetensors").exists():
            return safetensors_tensors(p / "model.safetensors")
        if (p / "pytorch_model.bin.index.json").exists():
            index = read_json(p / "pytorch_model.bin.index.json", "shard index")
            return torch_tensors(sorted(p / s for s in set(index["weight_map"].values())))
        if (p / "pytorch_model.bin").exists():
            return torch_tensors([p / "pytorch_model.bin"])
        raise CheckpointError(
            f"{p} has no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin")

    def _expected_shapes(self):
        module = module_for(self.config)
        abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs(self.config)))
        flat = traverse_util.flatten_dict(nn.unbox(abstract)["params"])
        return {path: tuple(leaf.shape) for path, leaf in flat.items()}

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s) for s in self._expected.values()))

    def param_bytes(self, dtype=jnp.float32) -> dict:
        """Bytes of ``{"layer": one layer, "non_layer": embeddings, norms and heads}`` in ``dtype``."""
        size = jnp.dtype(resolve_dtype(dtype)).itemsize
        layer = sum(int(np.prod(s[1:])) for p, s in self._expected.items() if p[0] == "layers")
        other = sum(int(np.prod(s)) for p, s in self._expected.items() if p[0] != "layers")
        return {"layer": layer * size, "non_layer": other * size}

    def _rule_for(self, ours: tuple, layer: bool):
        rule = self.names.rule_for(ours, layer)
        if rule is None:
            raise CheckpointError(f"no Hugging Face name is known for our parameter {'/'.join(ours)}")
        return rule

    def _read(self, rule, index: Optional[int], expected_shape: tuple, ours: str) -> np.ndarray:
        hf_name = rule.hf if index is None else rule.hf.format(i=index)
        if hf_name not in self._readers:
            raise CheckpointError(f"{self.path}: missing tensor {hf_name!r} (needed for parameter {ours})")
        array = convert(self._readers[hf_name](), rule)
        if tuple(array.shape) != tuple(expected_shape):
            raise CheckpointError(
                f"{self.path}: tensor {hf_name!r} has shape {tuple(array.shape)} after conversion, "
                f"expected {tuple(expected_shape)} for parameter {ours}")
        return array

    # -- sharded reading: each process reads only the slices its devices hold ---------------------------
    def _read_slice(self, rule, index: Optional[int], ours_index: tuple, expected_shape: tuple, ours: str,
                    cache: dict) -> np.ndarray:
        """``ours_index`` (slices of our layout, no layer axis) of the converted tensor of ``rule``.

        Safetensors: only the bytes of the slice are read (our index mapped back through the rule's
        transpose and ``part``); other formats (GGUF, ``.bin``): the whole tensor once, then sliced.
        """
        hf_name = rule.hf if index is None else rule.hf.format(i=index)
        if hf_name not in self._readers:
            raise CheckpointError(f"{self.path}: missing tensor {hf_name!r} (needed for parameter {ours})")
        reader = self._readers[hf_name]
        ranges = [s.indices(n)[:2] for s, n in zip(ours_index, expected_shape)]
        if not isinstance(reader, SafetensorsTensor):
            if hf_name not in cache:
                cache.clear()  # one whole tensor at a time
                cache[hf_name] = self._read(rule, index, expected_shape, ours)
            return cache[hf_name][tuple(slice(a, b) for a, b in ranges)]
        perm = {"copy": tuple(range(len(reader.shape))), "linear": (1, 0), "conv": (2, 3, 1, 0)}[rule.transform]
        converted = tuple(reader.shape[p] for p in perm)  # convert(): converted = hf.transpose(perm)
        if rule.part is not None:
            part, count = rule.part
            width = converted[-1] // count
            converted = converted[:-1] + (width,)
            ranges[-1] = (ranges[-1][0] + part * width, ranges[-1][1] + part * width)
        if converted != tuple(expected_shape):
            raise CheckpointError(
                f"{self.path}: tensor {hf_name!r} has shape {converted} after conversion, "
                f"expected {tuple(expected_shape)} for parameter {ours}")
        hf_index = [None] * len(perm)
        for j, p in enumerate(perm):
            hf_index[p] = slice(*ranges[j])
        return reader.read(tuple(hf_index)).transpose(perm)

    def _global_array(self, path: tuple, shape: tuple, sharding, dtype, layer: Optional[int] = None):
        """One parameter as a global array: each addressable device's slice read by this process only."""
        is_layer = path[0] == "layers"
        rule = self._rule_for(path[1:] if is_layer else path, layer=is_layer)
        name = "/".join(path)
        cache, pieces = {}, {}

        def callback(index):
            key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))  # replicas ask for the same slice
            if key not in pieces:
                if is_layer and layer is None:  # the stacked pool: leading axis = layer index
                    (lo, hi), rest = key[0], index[1:]
                    piece = np.stack([self._read_slice(rule, i, rest, shape[1:], name, cache)
                                      for i in range(lo, hi)])
                else:
                    piece = self._read_slice(rule, layer, index, shape, name, cache)
                pieces[key] = piece.astype(dtype, copy=False)
            return pieces[key]

        return jax.make_array_from_callback(shape, sharding, callback)

    def sharded_params(self, mesh, dtype=jnp.float32, rules=None) -> dict:
        """All parameters as global arrays on ``mesh``, placed by the axis rules (``radial_jax.scale.sharding``):
        every process reads only the slices its own devices hold; no host holds the whole model."""
        from jax.sharding import NamedSharding
        dtype = resolve_dtype(dtype)
        self.check_unexpected()
        specs = traverse_util.flatten_dict(logical_specs(module_for(self.config), *example_inputs(self.config),
                                                         rules=AXIS_RULES if rules is None else rules))
        flat = {path: self._global_array(path, shape, NamedSharding(mesh, fit_spec(specs[path], shape, mesh)), dtype)
                for path, shape in self._expected.items()}
        return traverse_util.unflatten_dict(flat)

    def layer_params_sharded(self, index: int, mesh, dtype=jnp.float32, rules=None) -> dict:
        """Layer ``index``'s parameters (no layer axis) as global arrays on ``mesh``, each process reading
        only its devices' slices (the streaming profiler on a mesh)."""
        from jax.sharding import NamedSharding, PartitionSpec
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer index {index} out of range [0, {self.num_layers})")
        dtype = resolve_dtype(dtype)
        specs = traverse_util.flatten_dict(logical_specs(module_for(self.config), *example_inputs(self.config),
                                                         rules=AXIS_RULES if rules is None else rules))
        flat = {}
        for path, shape in self._expected.items():
            if path[0] == "layers":
                spec = PartitionSpec(*tuple(specs[path])[1:])
                sharding = NamedSharding(mesh, fit_spec(spec, shape[1:], mesh))
                flat[path[1:]] = self._global_array(path, shape[1:], sharding, dtype, layer=index)
        return traverse_util.unflatten_dict(flat)

    def non_layer_params(self, dtype=jnp.float32) -> dict:
        """Every parameter outside the layer stack (embeddings, norms, heads), as numpy."""
        dtype = resolve_dtype(dtype)
        flat = {}
        for path, shape in self._expected.items():
            if path[0] == "layers":
                continue
            rule = self._rule_for(path, layer=False)
            flat[path] = self._read(rule, None, shape, "/".join(path)).astype(dtype, copy=False)
        return traverse_util.unflatten_dict(flat)

    def layer_params(self, index: int, dtype=jnp.float32) -> dict:
        """The parameters of layer ``index`` (no layer axis), as numpy."""
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer index {index} out of range [0, {self.num_layers})")
        dtype = resolve_dtype(dtype)
        flat = {}
        for path, shape in self._expected.items():
            if path[0] != "layers":
                continue
            rule = self._rule_for(path[1:], layer=True)
            flat[path[1:]] = self._read(rule, index, shape[1:],
                                        f"layers/{index}/" + "/".join(path[1:])).astype(dtype, copy=False)
        return traverse_util.unflatten_dict(flat)

    def check_unexpected(self) -> None:
        """Raise if the checkpoint holds tensors that no rule of this config uses."""
        used = set()
        for path in self._expected:
            if path[0] == "layers":
                rule = self._rule_for(path[1:], layer=True)
                used.update(rule.hf.format(i=i) for i in range(self.num_layers))
            else:
                used.add(self._rule_for(path, layer=False).hf)
        unexpected = sorted(n for n in set(self._readers) - used if not self.names.is_ignorable(n))
        if unexpected:
            raise CheckpointError(
                f"{self.path}: unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
                f"({len(unexpected)} in all) for a {type(self.config).__name__} with {self.num_layers} layers")

    @property
    def tokenizer_path(self) -> str:
        """Where ``load_tokenizer`` finds this checkpoint's tokenizer (the directory, or the GGUF file)."""
        return str(self.source if self.gguf is not None else self.path)

    def shell(self, dtype=jnp.float32, name: Optional[str] = None) -> Model:
        """A bundle of the non-layer parameters only (embeddings, norms, heads; ``params["layers"]`` is
        empty): it checks inputs, tokenizes and embeds, for work that streams the layers one at a time."""
        params = {**self.non_layer_params(dtype), "layers": {}}
        return Model(self.config, params, dtype=dtype, name=name or str(self.path), tokenizer_path=self.tokenizer_path)

    def params(self, dtype=jnp.float32) -> dict:
        """All parameters, layers stacked along a leading axis, as jax arrays."""
        self.check_unexpected()
        params = self.non_layer_params(dtype)
        per_layer = [self.layer_params(i, dtype) for i in range(self.num_layers)]
        params["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_layer)
        return jax.tree_util.tree_map(jnp.asarray, params)
