"""Run a bundle's network through a CPU inference engine (OpenVINO or ONNX Runtime) instead of eager torch.

Torch's CPU 3D convolutions are the wall for these networks; the engines fuse and re-layout them. The network
is exported once to ONNX with its real inputs (LViT's text included), compiled by the engine and cached on
disk under a key made of the weights' hash, the input shapes, the engine's version and the precision, so a
cache entry is never used across a mismatch and is rebuilt when any of them changes.

``BackendInferer`` wraps any MONAI inferer (sliding window, simple, LViT's text-prompted one): the wrapped
inferer calls a ``CompiledNetwork`` in place of the torch module, which pads every call to a fixed batch so
each window shape compiles once. ``backend="torch"`` keeps the eager path (with bf16 autocast when asked).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

from .inferers import AutocastInferer, _to_float

__all__ = ["BACKENDS", "BackendInferer", "CompiledNetwork", "EngineError", "engine_version", "weights_hash"]

BACKENDS = ("torch", "onnxruntime", "openvino")
# precisions each engine can run on CPU; onnxruntime's CPU kernels are float32 only
PRECISIONS = {
    "torch": ("float32", "bfloat16", "float16"),
    "onnxruntime": ("float32",),
    "openvino": ("float32", "bfloat16", "float16"),
}
_OPENVINO_HINT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_ONNX_OPSET = 17
_CACHE_FORMAT = 1
logger = logging.getLogger(__name__)
# engines alive in this process; a forked child (a DataLoader worker) must neither use nor destroy them
_LIVE_ENGINES: weakref.WeakSet = weakref.WeakSet()
_ORPHANED_IN_CHILD: list = []


class EngineError(RuntimeError):
    """An engine is missing, cannot compile the network, or was asked for something it cannot run."""


def engine_version(backend: str) -> str:
    """Version string of ``backend``'s package; raises ``EngineError`` naming the pip package when missing."""
    if backend == "torch":
        return torch.__version__
    try:
        if backend == "openvino":
            import openvino

            return openvino.__version__
        if backend == "onnxruntime":
            import onnxruntime

            return onnxruntime.__version__
    except ImportError as e:
        raise EngineError(f"backend {backend!r} is not installed (pip install {backend}): {e}") from e
    raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def weights_hash(network: torch.nn.Module) -> str:
    """BLAKE2b of every parameter and buffer (name, dtype, shape and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in network.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weights_fingerprint(network: torch.nn.Module) -> tuple:
    """Cheap change detector: tensor identities and in-place version counters (``load_state_dict`` bumps them)."""
    return tuple((id(t), t._version) for t in network.state_dict(keep_vars=True).values())


class CompiledNetwork:
    """Callable ``(*tensors) -> output(s)`` running ``network`` through ``backend`` at ``precision`` on CPU.

    Args:
        network: the torch module, weights loaded; it is exported in eval mode and left unchanged.
        backend: ``"onnxruntime"`` or ``"openvino"``.
        precision: ``"float32"``, or ``"bfloat16"``/``"float16"`` (OpenVINO's inference precision hint).
        cache_dir: folder for exported models (one ``<key>.onnx`` + ``<key>.json`` per input signature).
        batch_size: pad (or split) every call to this batch so one compiled shape serves the last,
            smaller sliding-window batch too; ``None`` compiles each batch size that arrives.
        threads: engine threads (default: ``torch.get_num_threads()``).
        engine_config: extra OpenVINO compile properties (e.g. ``{"PERF_COUNT": True}`` for ``profile``).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        backend: str,
        precision: str = "float32",
        cache_dir: str | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
        engine_config: dict | None = None,
    ) -> None:
        if backend not in BACKENDS[1:]:
            raise EngineError(f"CompiledNetwork runs an engine ({', '.join(BACKENDS[1:])}), not {backend!r}")
        if precision not in PRECISIONS[backend]:
            raise EngineError(f"{backend} runs {', '.join(PRECISIONS[backend])} on CPU, not {precision!r}")
        if any(p.device.type != "cpu" for p in network.parameters()):
            raise EngineError(f"{backend} runs on CPU but the network is on {next(network.parameters()).device}")
        self.network = network
        self.backend = backend
        self.precision = precision
        self.version = engine_version(backend)
        self.cache_dir = os.path.abspath(cache_dir or os.path.join(tempfile.gettempdir(), "monai_bundle_engines"))
        self.batch_size = batch_size
        self.threads = threads or torch.get_num_threads()
        self.engine_config = dict(engine_config or {})
        self.weights = weights_hash(network)
        self._fingerprint = _weights_fingerprint(network)
        self._sessions: dict[tuple, Any] = {}
        _LIVE_ENGINES.add(self)

    def is_current(self) -> bool:
        """Whether the network's weights are still those this engine was built from."""
        if _weights_fingerprint(self.network) == self._fingerprint:
            return True
        return weights_hash(self.network) == self.weights

    def __call__(self, *inputs: torch.Tensor | None, **kwargs: Any) -> Any:
        if kwargs:
            raise EngineError(f"{self.backend} engines take positional tensors only, got keywords {sorted(kwargs)}")
        tensors = [t for t in inputs if t is not None]
        if not tensors or any(not isinstance(t, torch.Tensor) for t in tensors):
            raise EngineError(f"{self.backend} engines take tensors only, got {[type(t).__name__ for t in inputs]}")
        n = tensors[0].shape[0]
        step = self.batch_size or n
        chunks = [self._run([t[i : i + step] for t in tensors], step) for i in range(0, n, step)]
        outputs = [torch.cat(parts) for parts in zip(*chunks)]
        device = tensors[0].device
        outputs = [o.to(device) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _run(self, tensors: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
        n = tensors[0].shape[0]
        if n < batch:  # pad the last window batch with zeros: one compiled shape for every call
            tensors = [torch.cat([t, t.new_zeros((batch - n, *t.shape[1:]))]) for t in tensors]
        arrays = [t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for t in tensors]
        signature = tuple((a.shape, str(a.dtype)) for a in arrays)
        session = self._sessions.get(signature)
        if session is None:
            session = self._sessions[signature] = self._build(tensors, signature)
        return [torch.from_numpy(np.asarray(o))[:n] for o in session(arrays)]

    def _key(self, signature: tuple) -> dict:
        return {
            "format": _CACHE_FORMAT,
            "network": type(self.network).__qualname__,
            "weights": self.weights,
            "inputs": [[list(shape), dtype] for shape, dtype in signature],
            "backend": self.backend,
            "engine_version": self.version,
            "precision": self.precision,
            "torch": torch.__version__,
            "opset": _ONNX_OPSET,
        }

    def _build(self, tensors: list[torch.Tensor], signature: tuple):
        key = self._key(signature)
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        onnx_path = os.path.join(self.cache_dir, f"{name}.onnx")
        manifest_path = os.path.join(self.cache_dir, f"{name}.json")
        if os.path.exists(onnx_path):
            stale = _read_manifest(manifest_path) != key
            if not stale:
                try:
                    logger.info("%s: loading cached engine %s", self.backend, onnx_path)
                    return self._compile(onnx_path)
                except Exception as e:  # a truncated or foreign file under our name
                    logger.warning("%s: cached engine %s is unreadable (%s); rebuilding it", self.backend, onnx_path, e)
            else:
                logger.warning("%s: cached engine %s does not match its manifest; rebuilding it", self.backend, name)
        logger.info("%s: exporting %s for inputs %s to %s", self.backend, key["network"], key["inputs"], onnx_path)
        _export_onnx(self.network, tensors, onnx_path)
        _write_atomically(manifest_path, json.dumps(key, indent=4).encode())
        try:
            return self._compile(onnx_path)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"{self.backend} could not compile {key['network']} ({onnx_path}): {reason}") from e

    def _compile(self, onnx_path: str):
        if self.backend == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            return lambda arrays: session.run(None, dict(zip(names, arrays)))
        config = {
            "CACHE_DIR": os.path.join(self.cache_dir, "openvino"),
            "INFERENCE_PRECISION_HINT": _OPENVINO_HINT[self.precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
            **self.engine_config,
        }
        compiled = _openvino_core().compile_model(onnx_path, "CPU", config)
        granted = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if _OPENVINO_HINT[self.precision] not in granted and self.precision not in granted:
            logger.warning("openvino: this CPU cannot run %s; it runs %s instead", self.precision, granted)
        request = compiled.create_infer_request()

        def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
            request.infer(arrays, share_inputs=True)
            return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

        run.request = request
        return run

    def profile(self, top: int = 8) -> list[str]:
        """OpenVINO's last-call profile (needs ``PERF_COUNT``): time per layer type and kernel, largest first."""
        totals: dict[tuple[str, str], float] = {}
        for session in self._sessions.values():
            request = getattr(session, "request", None)
            for info in request.get_profiling_info() if request is not None else []:
                key = (info.node_type, info.exec_type)
                totals[key] = totals.get(key, 0.0) + info.real_time.total_seconds()
        overall = sum(totals.values()) or 1.0
        ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
        return [f"{node} [{kernel}] {t:.3f} s ({100 * t / overall:.0f}%)" for (node, kernel), t in ranked]


@functools.cache
def _openvino_core() -> Any:
    """One OpenVINO ``Core`` for the process, never freed.

    OpenVINO's CPU plugin points the calling thread's alternate signal stack at a buffer of its own when it is
    created and restores the previous one when it is destroyed; plugins (one per ``Core``) destroyed in any order
    but the reverse leave the thread's alternate stack on unmapped memory, and the next signal delivered to it
    (a ``SIGCHLD`` when a DataLoader worker or subprocess exits) kills the process with ``SIGSEGV``.
    """
    import openvino

    return openvino.Core()


def _orphan_engines_in_child() -> None:
    """After ``fork``: keep the parent's compiled engines alive forever and out of use in the child.

    An OpenVINO engine's destructor joins its thread pool, whose threads do not exist in a forked child: freeing
    one there (the garbage collector does, in any DataLoader worker forked after an inference, e.g. MONAI Label
    training after serving a label) blocks that worker forever. The child compiles its own engine if it needs one.
    """
    for engine in list(_LIVE_ENGINES):
        _ORPHANED_IN_CHILD.append(engine._sessions)
        engine._sessions = {}


os.register_at_fork(after_in_child=_orphan_engines_in_child)


def _read_manifest(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_atomically(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _export_onnx(network: torch.nn.Module, tensors: Sequence[torch.Tensor], path: str) -> None:
    """Export ``network(*tensors)`` to ``path`` (atomically), in eval mode, outputs flattened."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".onnx", dir=os.path.dirname(path))
    os.close(fd)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            torch.onnx.export(
                network,
                tuple(tensors),
                tmp,
                input_names=[f"input{i}" for i in range(len(tensors))],
                dynamo=False,
                opset_version=_ONNX_OPSET,
            )
        os.replace(tmp, path)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngineError(f"ONNX export of {type(network).__qualname__} failed: {reason}") from e
    finally:
        network.train(was_training)
        if os.path.exists(tmp):
            os.remove(tmp)


class BackendInferer(Inferer):
    """Run ``inferer`` with the network executed by ``backend`` at ``precision``.

    Args:
        inferer: any MONAI inferer; it calls the compiled network in place of the torch module.
        backend: ``"torch"`` (eager, bf16/fp16 through autocast), ``"onnxruntime"`` or ``"openvino"``.
        precision: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        cache_dir: where exported engines are kept (see ``CompiledNetwork``).
        batch_size: fixed engine batch (the sliding window's ``sw_batch_size``); smaller calls are padded.
        fallback: when the engine is missing or cannot compile the network, log why and run torch
            instead; when ``False`` the ``EngineError`` propagates.
        engine_config: extra engine compile properties (see ``CompiledNetwork``).
    """

    def __init__(
        self,
        inferer: Inferer,
        backend: str = "torch",
        precision: str = "float32",
        cache_dir: str | None = None,
        batch_size: int | None = None,
        fallback: bool = True,
        engine_config: dict | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS["torch"]:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS['torch'])}")
        self.inferer = inferer
        self.backend = backend
        self.precision = precision
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.fallback = fallback
        self.engine_config = engine_config
        self._torch = AutocastInferer(inferer, dtype=precision, enabled=precision != "float32")
        self._engine: _Guarded | None = None
        self._failed: set[int] = set()

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        engine = self._engine_for(network) if self.backend != "torch" else None
        if engine is None:
            return self._torch(inputs, network, *args, **kwargs)
        return _with_meta_of(inputs, self.inferer(inputs, engine, *args, **kwargs))

    def _engine_for(self, network: Any) -> _Guarded | None:
        if id(network) in self._failed:
            return None
        same = self._engine is not None and self._engine.engine.network is network
        if same and self._engine.engine.is_current():
            return self._engine
        if same:
            logger.info("%s: the network's weights changed; rebuilding the engine", self.backend)
        try:
            if not isinstance(network, torch.nn.Module):
                raise EngineError(f"{self.backend} compiles a torch.nn.Module, got {type(network).__name__}")
            engine = CompiledNetwork(
                network, self.backend, self.precision, self.cache_dir, self.batch_size, engine_config=self.engine_config
            )
        except EngineError as e:
            return self._fall_back(network, e)
        self._engine = _Guarded(self, engine)
        return self._engine

    def _fall_back(self, network: Any, error: EngineError) -> None:
        if not self.fallback:
            raise error
        logger.warning("%s; falling back to torch (%s) as the config allows", error, self.precision)
        self._failed.add(id(network))
        return None


def _with_meta_of(inputs: torch.Tensor, outputs: Any) -> Any:
    """Engine outputs carry the input's meta and transform trace, as torch's own forward of a ``MetaTensor`` does.

    ``Invertd`` (in every 2D bundle's postprocessing, and in MONAI Label's) undoes the preprocessing from that trace;
    without it the label map stays at the network's input size.
    """
    if not isinstance(inputs, MetaTensor):
        return outputs
    if isinstance(outputs, torch.Tensor) and not isinstance(outputs, MetaTensor):
        return convert_to_dst_type(outputs, inputs, device=outputs.device, dtype=outputs.dtype)[0]
    return outputs


class _Guarded:
    """The engine as the inner inferer sees it: a compile failure on a new shape falls back to torch once."""

    def __init__(self, owner: BackendInferer, engine: CompiledNetwork) -> None:
        self.owner = owner
        self.engine = engine

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        if id(self.engine.network) not in self.owner._failed:
            try:
                return self.engine(*inputs, **kwargs)
            except EngineError as e:
                self.owner._fall_back(self.engine.network, e)
        reduced = self.owner.precision != "float32"
        with torch.autocast("cpu", dtype=self.owner._torch.dtype) if reduced else contextlib.nullcontext():
            return _to_float(self.engine.network(*inputs, **kwargs))
