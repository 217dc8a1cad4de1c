"""A transformers model run one decoder layer at a time, its weights read from the safetensors
shards as each layer runs and dropped after (`surgery analyze`, and the hidden-state router gates
of `upcycle`): the model's own classes with parameters on the meta device (accelerate's
init_empty_weights), the small non-layer parameters read whole, the token embedding streamed by
the rows a batch uses. One forward pass with every decoder layer replaced by a recorder captures
the arguments each layer receives (position embeddings, its own attention mask) and the embedding
output; then `layer(i)` materialises one layer at a time. Peak memory: about one layer plus the
activations at one depth."""

from __future__ import annotations

import contextlib
import math
import weakref

import torch

from surgery.errors import CheckpointError, SurgeryError


class LayerwiseModel:
    """`ck`'s base model (no LM head) on `device` in `dtype`, layers on the meta device until `layer(i)`."""

    def __init__(self, ck, config, device: str, dtype):
        import transformers

        self.ck, self.config, self.device, self.dtype = ck, config, device, dtype
        with empty_weights():
            self.base = transformers.AutoModel.from_config(config, trust_remote_code=False)
        self.base.eval()
        self.layers, self.layer_path = layer_list(self.base, ck.family.layer_prefix)
        base_prefix = ck.family.layer_prefix[: -len(self.layer_path) - 1]  # "model." for "model.layers."
        self.reader = Reader(ck)
        # everything but the decoder layers and the token embedding: read (small)
        self.emb_name = next((n for n in ck.family.embeddings if n in ck.tensors), None)
        for pname, _ in list(self.base.named_parameters()):
            if pname.startswith(self.layer_path + ".") or base_prefix + pname == self.emb_name:
                continue
            set_param(self.base, pname, self.reader.tensor(base_prefix + pname).to(device, dtype))
        for bname, buf in list(self.base.named_buffers()):
            if buf.device.type != "meta":
                set_buffer(self.base, bname, buf.to(device))
        if self.emb_name is not None:
            stream_embedding(self.base, self.emb_name[len(base_prefix) :].removesuffix(".weight"), self.reader, self.emb_name, dtype)

    def __len__(self) -> int:
        return len(self.layers)

    def capture(self, batches: list[dict]) -> tuple[list, list]:
        """Per batch (the model's keyword inputs): the embedding output entering layer 0, and the
        call (args, kwargs) each layer receives."""
        recorders = [Recorder(layer) for layer in self.layers]
        originals = list(self.layers)
        for i, r in enumerate(recorders):
            self.layers[i] = r
        h0, calls = [], []
        try:
            with torch.no_grad():
                for b in batches:
                    for r in recorders:
                        r.calls.clear()
                    self.base(**{k: v.to(self.device) for k, v in b.items()}, use_cache=False)
                    h0.append(recorders[0].calls[0][0])
                    calls.append([r.calls[0] for r in recorders])
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        return h0, calls

    @contextlib.contextmanager
    def layer(self, i: int):
        """Layer i with its weights read; dropped again on leaving."""
        layer = self.layers[i]
        materialize(layer, self.reader, f"{self.ck.family.layer_prefix}{i}.", self.device, self.dtype)
        try:
            yield layer
        finally:
            release(layer)

    def close(self) -> None:
        self.reader.close()


def run_layer(layer, x, call):
    _, args, kwargs = call
    y = layer(x, *args, **kwargs)
    return y[0] if isinstance(y, tuple) else y


class Recorder(torch.nn.Module):
    """Stands in for a decoder layer during the capture pass: records the arguments it is called
    with and returns its input, so the model's loop runs through without any layer's weights."""

    def __init__(self, layer):
        super().__init__()
        self.calls: list = []
        self.attention_type = getattr(layer, "attention_type", None)  # some models pick masks by it

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


class Reader:
    """Tensors of a checkpoint by name, read through the engine's `Sources` (pread into each
    tensor's own storage) and surgery's header catalog."""

    def __init__(self, ck):
        from surgery.engine.read import Sources

        self.ck = ck
        self.src = Sources()
        weakref.finalize(self, self.src.close)  # the descriptors close on an error path too

    def _info(self, name: str):
        info = self.ck.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name!r} is missing", where=str(self.ck.path))
        return info

    def tensor(self, name: str):
        """The whole tensor, read straight into its own storage (no intermediate bytes)."""
        from surgery.engine.read import torch_dtype

        info = self._info(name)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        self.src.read_into(info, 0, raw.numpy())
        return raw.view(torch_dtype(info.dtype)).reshape(info.shape)

    def _rows_of(self, name: str):
        """A 2-D tensor's info, elements per row and bytes per row."""
        info = self._info(name)
        return info, info.shape[1], info.shape[1] * (info.nbytes // max(1, math.prod(info.shape)))

    def rows(self, name: str, ids):
        """Rows `ids` of a 2-D tensor, each read on its own into one buffer."""
        from surgery.engine.read import torch_dtype

        info, per_row, width = self._rows_of(name)
        raw = torch.empty(len(ids) * width, dtype=torch.uint8)
        view = raw.numpy()
        for k, i in enumerate(ids):
            self.src.read_into(info, int(i) * per_row, view[k * width : (k + 1) * width])
        return raw.view(torch_dtype(info.dtype)).reshape(len(ids), per_row)

    def row_block(self, name: str, a: int, b: int):
        """Rows [a, b) of a 2-D tensor, in one read."""
        from surgery.engine.read import torch_dtype

        info, per_row, width = self._rows_of(name)
        raw = torch.empty((b - a) * width, dtype=torch.uint8)
        self.src.read_into(info, a * per_row, raw.numpy())
        return raw.view(torch_dtype(info.dtype)).reshape(b - a, per_row)

    def close(self) -> None:
        self.src.close()


def empty_weights():
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)  # parameters on meta; buffers (rotary inv_freq) real


def layer_list(base, layer_prefix: str):
    import torch

    for name, mod in base.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and layer_prefix.endswith(name + "."):
            return mod, name
    raise SurgeryError(f"cannot find the decoder layers ({layer_prefix}) in the transformers model")


def set_param(module, dotted: str, value) -> None:
    import torch

    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def set_buffer(module, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    module._buffers[leaf] = value


def stream_embedding(base, attr_path: str, reader: Reader, name: str, dtype) -> None:
    """Replace the token embedding by one that reads only the rows a batch uses."""
    import torch

    *path, leaf = attr_path.split(".")
    owner = base
    for p in path:
        owner = getattr(owner, p)
    old = getattr(owner, leaf)

    class RowsFromDisk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding_dim = old.embedding_dim
            self.padding_idx = getattr(old, "padding_idx", None)
            self.scale = getattr(old, "embed_scale", None)  # Gemma's scaled embedding module

        def forward(self, ids):
            uniq, inv = torch.unique(ids, return_inverse=True)
            rows = reader.rows(name, uniq.tolist()).to(ids.device, dtype)
            out = rows[inv]
            if self.scale is not None:
                out = out * self.scale.to(out.dtype)
            return out

    setattr(owner, leaf, RowsFromDisk())


def materialize(layer, reader: Reader, prefix: str, device: str, dtype) -> None:
    for pname, p in list(layer.named_parameters()):
        set_param(layer, pname, layer_tensor(reader, prefix, pname, tuple(p.shape)).to(device, dtype))


def layer_tensor(reader: Reader, prefix: str, pname: str, shape: tuple):
    if prefix + pname in reader.ck.tensors:
        return reader.tensor(prefix + pname)
    for layout in reader.ck.family.stored_layouts(pname):  # the family's data: renamed or fused in memory
        if "{e}" not in layout[0]:
            if prefix + layout[0] in reader.ck.tensors:
                return reader.tensor(prefix + layout[0])
        elif prefix + layout[0].format(e=0) in reader.ck.tensors:
            return torch.stack([torch.cat([reader.tensor(prefix + part.format(e=e)) for part in layout], dim=0) for e in range(shape[0])])
    raise CheckpointError(
        f"no tensor for {prefix}{pname} (shape {list(shape)}) in the checkpoint",
        where=str(reader.ck.path),
        fix="this layout is not one surgery analyze can stream yet",
    )


def release(layer) -> None:
    for pname, p in list(layer.named_parameters()):
        set_param(layer, pname, torch.empty(p.shape, device="meta"))
    trim_heap()


def trim_heap() -> None:
    """Give freed heap memory back to the OS. Tensors under glibc's mmap threshold (32 MB once it
    has grown) come from the heap, and chunks freed between layers would otherwise stay in the
    process (measured on an 8B shape: RSS crept up 10-30 MB per layer without this)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
