"""FakeNvml: a FAKE pynvml for tests, standing in for GPUs this machine does not have."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

__all__ = ["FakeGpu", "FakeNVMLError", "FakeNvml", "fake_two_gpus"]

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15

_TEXT = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}


class FakeNVMLError(Exception):
    """The FAKE NVMLError: carries ``value`` like pynvml's."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _TEXT.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeGpu:
    """One FAKE GPU; ``unsupported`` names readings that raise NotSupported."""

    name: str | bytes
    uuid: str | bytes
    util: int = 0
    used: int = 0
    total: int = 80 * 2**30
    temp: int = 40
    power_mw: int = 100_000
    limit_mw: int = 400_000
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)


class FakeNvml:
    """A FAKE pynvml module (the functions engine.gpu calls), for machines without GPUs.

    Args:
        gpus: the FAKE devices.
        init_error: an NVML error code that ``nvmlInit`` raises (None: it succeeds).
        no_v3: the driver lacks ``nvmlDeviceGetComputeRunningProcesses_v3``
            (FunctionNotFound), as older drivers do.
    """

    NVMLError = FakeNVMLError
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_TEMPERATURE_GPU = 0

    def __init__(
        self, gpus: list[FakeGpu], init_error: int | None = None, no_v3: bool = False
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.no_v3 = no_v3
        self.initialized = False
        self.init_calls = 0
        self.shutdown_calls = 0
        self.count_error: int | None = None

    # -- lifecycle --------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self.initialized = False

    def _check(self) -> None:
        if not self.initialized:
            raise FakeNVMLError(NVML_ERROR_UNINITIALIZED)

    # -- devices ----------------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        if self.count_error is not None:
            raise FakeNVMLError(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check()
        return self.gpus[index]

    def _get(self, gpu: FakeGpu, reading: str) -> Any:
        self._check()
        if reading in gpu.unsupported:
            raise FakeNVMLError(NVML_ERROR_NOT_SUPPORTED)
        return getattr(gpu, reading)

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str | bytes:
        return self._get(gpu, "name")

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str | bytes:
        return self._get(gpu, "uuid")

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._get(gpu, "util"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> SimpleNamespace:
        used = self._get(gpu, "used")
        return SimpleNamespace(used=used, total=gpu.total, free=gpu.total - used)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._get(gpu, "temp")

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        return self._get(gpu, "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu: FakeGpu) -> int:
        return self._get(gpu, "limit_mw")

    def _procs(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in self._get(gpu, "processes")
        ]

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        if self.no_v3:  # like nvidia-ml-py, the unversioned name calls the v3 symbol
            raise FakeNVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        return self._procs(gpu)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return self._procs(gpu)


def fake_two_gpus(our_pid: int = 1000) -> FakeNvml:
    """Two FAKE GPUs: an A100 whose name comes back as bytes, an RTX A6000 as str.

    GPU 1 does not support temperature or power readings (NotSupported → N/A).
    """
    return FakeNvml(
        [
            FakeGpu(
                name=b"NVIDIA A100-SXM4-80GB",
                uuid=b"GPU-fake-0000",
                util=87,
                used=30 * 2**30,
                temp=65,
                power_mw=250_000,
                limit_mw=400_000,
                processes=[(4321, 2 * 2**30), (our_pid, 20 * 2**30)],
            ),
            FakeGpu(
                name="NVIDIA RTX A6000",
                uuid="GPU-fake-0001",
                util=12,
                used=3 * 2**30,
                total=48 * 2**30,
                processes=[(our_pid + 1, None)],
                unsupported={"temp", "power_mw", "limit_mw"},
            ),
        ]
    )
