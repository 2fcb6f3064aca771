"""Pre-, post- and client-state processors of the update pipeline (``DataProcessor.process``)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import clara_compat, he
from engine.client.fl_context import FLContext
from engine.components import build_component
from engine.config import ComponentSpec, ConfigError
from protos import federated_pb2 as pb

__all__ = [
    "CLIENT_STATE_PROCESSORS",
    "BestMetricGenerator",
    "ClientStateProcessor",
    "DataCompressor",
    "DataContext",
    "DataDeCompressor",
    "DataProcessor",
    "IteratorNumberGenerator",
    "ModelDecryptor",
    "ModelEncryptor",
    "build_client_state_processors",
    "build_processors",
    "he_processors",
    "missing_decryptor",
]


@dataclass
class DataContext:
    """What a processor sees: the tensors, the message header, the step's context."""

    model: dict[str, np.ndarray]
    header: Any = None  # pb.Contribution on the way out, pb.CurrentModel on the way in
    fl_ctx: FLContext = field(default_factory=FLContext)


class DataProcessor:
    """Changes a DataContext in place (pre: before upload; post: after download)."""

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        raise NotImplementedError


class IteratorNumberGenerator(DataProcessor):
    """Writes the number of local iterations into the contribution (``n_iter``)."""

    def __init__(self, field: str = "n_iter") -> None:
        if field != "n_iter":
            raise ValueError(f"field must be 'n_iter', got {field!r}")
        self.field = field

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        n_iter = int(data_ctx.fl_ctx.get_prop("n_iter", 1))
        if isinstance(data_ctx.header, pb.Contribution):
            data_ctx.header.n_iter = max(1, n_iter)


class BestMetricGenerator(DataProcessor):
    """Writes the best local validation metric into the contribution's metadata."""

    def __init__(self, field: str = "best_validation_metric") -> None:
        self.field = field

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        best = data_ctx.fl_ctx.get_prop("best_validation_metric")
        if best is not None and isinstance(data_ctx.header, pb.Contribution):
            data_ctx.header.meta_data.update({self.field: float(best)})


class DataCompressor(DataProcessor):
    """Clara's DataCompressor (pre-processor): the update travels compressed.

    Clara zipped each tensor's bytes inside the message. Here models move as streams of raw
    chunks, and the gRPC channel compresses them: listing DataCompressor (or DataDeCompressor)
    makes the site's channel use Gzip when ``compression`` is not set (see
    ``MMARClientConfig.wire_compression``), so the arrays themselves pass through unchanged.
    """

    #: The channel compression this processor asks for.
    compression = "Gzip"

    def __init__(self, **args: Any) -> None:
        if args:
            raise ValueError(f"DataCompressor takes no arguments, got {sorted(args)}")

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        data_ctx.fl_ctx.set_prop("wire_compression", self.compression)


class DataDeCompressor(DataCompressor):
    """Clara's DataDeCompressor (post-processor): a compressed model is decompressed.

    gRPC decompresses what the server sent compressed before the stream reaches the site, so
    the arrays pass through unchanged; like DataCompressor it asks for a Gzip channel.
    """

    def __init__(self, **args: Any) -> None:
        if args:
            raise ValueError(f"DataDeCompressor takes no arguments, got {sorted(args)}")


def _find_context(file: str, startups: list[Path]) -> Path:
    path = Path(file).expanduser()
    if path.is_absolute():
        return path
    for folder in startups:
        if (folder / path).is_file():
            return folder / path
    tried = ", ".join(str(f / path) for f in startups) or str(path)
    raise he.HEError(
        f"no HE context {file!r} for this site (looked for {tried}); homomorphic encryption "
        f"needs the {he.CLIENT_CONTEXT} of this site's startup kit (fltui provision with "
        '"homomorphic_encryption" in the project file)'
    )


class _HEProcessor(DataProcessor):
    def __init__(self, tenseal_context_file: str, context: Any = None) -> None:
        he.tenseal()  # a site asked for HE without TenSEAL is told which extra to install
        self.tenseal_context_file = tenseal_context_file
        self._startups = [*(context or {}).get("startup_dirs", []), Path.cwd() / "startup"]
        self._ctx: Any = None
        self.seconds = 0.0
        self.variables = 0

    @property
    def context_path(self) -> Path:
        return _find_context(self.tenseal_context_file, self._startups)

    def tenseal_context(self) -> Any:
        """The site's context (with the secret key), loaded and checked on first use."""
        if self._ctx is None:
            self._ctx = he.load_context(self.context_path, "site")
        return self._ctx

    def _convert(
        self,
        model: dict[str, np.ndarray],
        chosen: Callable[[str, np.ndarray], bool],
        convert: Callable[[np.ndarray], np.ndarray],
    ) -> dict[str, np.ndarray]:
        """``model`` with the chosen variables converted (encrypted or decrypted), the others as
        they are; the time it took and the sizes before and after are kept."""
        t0 = time.perf_counter()
        before = after = count = 0
        out: dict[str, np.ndarray] = {}
        for name, value in model.items():
            arr = np.asanyarray(value)  # a ciphertext stays a CiphertextArray
            if chosen(name, arr):
                out[name] = convert(arr)
                before += arr.nbytes
                after += out[name].nbytes
                count += 1
            else:
                out[name] = value
        self.seconds = time.perf_counter() - t0
        self.bytes_before, self.bytes_after, self.variables = before, after, count
        return out


class ModelEncryptor(_HEProcessor):
    """Clara's ModelEncryptor (pre-processor; NVFlare's HEModelEncryptor): Δ leaves encrypted.

    Runs after privacy. Each float variable chosen by ``encrypt_layers`` (None or True: all;
    a list of names; or a regex string) is multiplied by ``n_iter`` (``weigh_by_local_iter``)
    and encrypted with CKKS into one ciphertext tensor; the server adds ciphertexts and
    multiplies by 1/Σn_iter without the secret key. Other variables travel in the clear.

    Args:
        tenseal_context_file: the site's context with the secret key (relative: looked up in
            the site's ``startup/``).
        encrypt_layers: which variables to encrypt.
        weigh_by_local_iter: multiply by ``n_iter`` before encryption (the server cannot).
    """

    def __init__(
        self,
        tenseal_context_file: str = he.CLIENT_CONTEXT,
        encrypt_layers: Any = None,
        weigh_by_local_iter: bool = True,
        aggregation_weights: Any = None,
        context: Any = None,
    ) -> None:
        if aggregation_weights:
            raise ValueError(
                "aggregation_weights belong to the server's aggregator here, not the encryptor"
            )
        names = isinstance(encrypt_layers, list) and all(isinstance(x, str) for x in encrypt_layers)
        if not (encrypt_layers is None or isinstance(encrypt_layers, (bool, str)) or names):
            raise ValueError(
                f"encrypt_layers: expected true, a list of variable names or a regex, "
                f"got {encrypt_layers!r}"
            )
        if isinstance(encrypt_layers, str):
            try:
                re.compile(encrypt_layers)
            except re.error as exc:
                raise ValueError(f"encrypt_layers: not a regex ({exc})") from None
        super().__init__(tenseal_context_file, context)
        self.encrypt_layers = encrypt_layers
        self.weigh_by_local_iter = bool(weigh_by_local_iter)
        self.bytes_before = self.bytes_after = 0

    def selected(self, name: str, value: np.ndarray) -> bool:
        if value.dtype.kind != "f" or value.size == 0:
            return False
        layers = self.encrypt_layers
        if layers is None or layers is True:
            return True
        if layers is False:
            return False
        if isinstance(layers, str):
            return re.search(layers, name) is not None
        return name in layers

    def encrypt_model(
        self, model: dict[str, np.ndarray], factor: float = 1.0
    ) -> dict[str, np.ndarray]:
        """``model`` with the chosen variables encrypted (times ``factor``); times and sizes
        kept in ``seconds``, ``bytes_before`` and ``bytes_after``."""
        ctx = self.tenseal_context()
        return self._convert(model, self.selected, lambda arr: he.encrypt(ctx, arr, factor))

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        header = data_ctx.header
        n_iter = int(getattr(header, "n_iter", 0) or data_ctx.fl_ctx.get_prop("n_iter", 1) or 1)
        factor = float(max(1, n_iter)) if self.weigh_by_local_iter else 1.0
        data_ctx.model = self.encrypt_model(data_ctx.model, factor)
        data_ctx.fl_ctx.set_prop("he_encrypt_seconds", self.seconds)
        if isinstance(header, pb.Contribution):
            # What the server needs to know: the weight is inside the ciphertext already.
            header.meta_data.update(
                {
                    "he": he.CKKS,
                    "he_weighted": self.weigh_by_local_iter,
                    "he_bytes": self.bytes_after,
                }
            )


class ModelDecryptor(_HEProcessor):
    """Clara's ModelDecryptor (post-processor; NVFlare's HEModelDecryptor): the encrypted
    global model is decrypted with the site's secret key before anything uses it.

    Args:
        tenseal_context_file: as for ModelEncryptor.
    """

    def __init__(self, tenseal_context_file: str = he.CLIENT_CONTEXT, context: Any = None) -> None:
        super().__init__(tenseal_context_file, context)
        self.bytes_before = self.bytes_after = 0

    def decrypt_model(self, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``model`` with every ciphertext decrypted (the same dict when it holds none); time
        and sizes kept in ``seconds``, ``bytes_before`` (ciphertext) and ``bytes_after``."""
        if not any(he.is_ciphertext(v) for v in model.values()):
            self.seconds = 0.0  # the first round's model (plaintext initial weights)
            self.bytes_before = self.bytes_after = self.variables = 0
            return model
        ctx = self.tenseal_context()
        return self._convert(
            model, lambda name, arr: he.is_ciphertext(arr), lambda arr: he.decrypt(ctx, arr)
        )

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        data_ctx.model = self.decrypt_model(data_ctx.model)
        if self.bytes_before:
            data_ctx.fl_ctx.set_prop("he_decrypt_seconds", self.seconds)


def he_processors(
    pre_processors: list[Any], post_processors: list[Any]
) -> tuple[ModelEncryptor | None, ModelDecryptor | None]:
    """The site's ModelEncryptor (pre) and ModelDecryptor (post), where it lists them."""
    enc = next((p for p in pre_processors if isinstance(p, ModelEncryptor)), None)
    dec = next((p for p in post_processors if isinstance(p, ModelDecryptor)), None)
    return enc, dec


def missing_decryptor(what: str) -> he.HEError:
    """The refusal for a site that got ciphertexts and has no ModelDecryptor to read them."""
    return he.HEError(
        f"{what} is encrypted (homomorphic encryption: this federation was provisioned with "
        '"homomorphic_encryption"), and this site cannot decrypt it: add '
        '{"name": "ModelDecryptor"} to the post_processors of config_fed_client.json (and '
        '{"name": "ModelEncryptor"} to its pre_processors), with this site\'s '
        f"startup/{he.CLIENT_CONTEXT} from its provisioned kit"
    )


DATA_PROCESSORS: dict[str, type] = {
    "IteratorNumberGenerator": IteratorNumberGenerator,
    "BestMetricGenerator": BestMetricGenerator,
    "DataCompressor": DataCompressor,
    "DataDeCompressor": DataDeCompressor,
    "ModelEncryptor": ModelEncryptor,
    "ModelDecryptor": ModelDecryptor,
}


def build_processors(
    specs: list[ComponentSpec], search_paths: list[Path] | None = None
) -> list[Any]:
    """Instantiates a config's processor list, in order.

    Code written for Clara imports its base class from Clara's module
    (``fed_learn.components.data_processor``): those paths are made to mean ours first.
    """
    clara_compat.install()
    # An MMAR deployed at a site lies in <workspace>/run_<N>/mmar_<site>/: the HE processors
    # find the site's context in <workspace>/startup/ (engine.site.paths' layout).
    startups = [Path(p).parent.parent.parent / "startup" for p in search_paths or []]
    return [
        build_component(
            s,
            DATA_PROCESSORS,
            "data processor",
            None,
            search_paths,
            context={"startup_dirs": startups},
        )
        for s in specs
    ]


class ClientStateProcessor:
    """Adds metadata to every ClientState this site sends (``client_state_processors``).

    The lineage's hook: the communicator calls ``process`` on the ClientState of every call
    (registration aside: GetModel, SubmitUpdate, Heartbeat, Quit, cross-site validation),
    with the client's ``app_ctx`` (site, round, status). A processor writes into
    ``client_state.meta_data`` (a protobuf Struct: ``client_state.meta_data.update({...})``)
    in place, or returns the ClientState to send instead. The server receives it with the
    call; the reference server does not read it.

    No processor is built in (Clara's ``MetadataGenerator`` is named in its module list, but
    what it wrote is not public): a site's own one is given by ``path``, under the site policy.
    Deriving from this class is not required (Clara's code derives from Clara's base); a
    ``process(client_state, app_ctx)`` method is.
    """

    def process(self, client_state: pb.ClientState, app_ctx: dict[str, Any]) -> Any:
        raise NotImplementedError


#: Built-in client-state processors, by name: none (see ClientStateProcessor).
CLIENT_STATE_PROCESSORS: dict[str, type] = {}


def build_client_state_processors(
    specs: list[ComponentSpec], search_paths: list[Path] | None = None
) -> list[Any]:
    """Instantiates ``client_state_processors``, in order.

    Raises:
        ConfigError: what ``build_component`` raises, or a component without a callable
            ``process(client_state, app_ctx)`` (named by file and key).
    """
    clara_compat.install()
    built = []
    for spec in specs:
        processor = build_component(
            spec, CLIENT_STATE_PROCESSORS, "client state processor", None, search_paths
        )
        if not callable(getattr(processor, "process", None)):
            which = "path" if spec.path else "name"
            key = f"{spec.key}.{which}" if spec.key else which
            raise ConfigError(
                spec.file or Path("<config>"),
                key,
                f"{spec.label!r} has no process(client_state, app_ctx) method; a client "
                "state processor adds metadata to every ClientState through it",
            )
        built.append(processor)
    return built
