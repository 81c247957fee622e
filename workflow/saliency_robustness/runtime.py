"""What every stage needs at run time: device choice, threads, logging, progress, one-line errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from saliency_robustness.errors import PipelineError

DEVICE_ENV = "SALIENCY_ROBUSTNESS_DEVICE"
log = logging.getLogger("saliency_robustness")
T = TypeVar("T")


def resolve_device(requested: torch.device | str | None = None) -> torch.device:
    """``auto`` (default): the GPU the scheduler gave us when there is one, else the CPU.

    The override comes from the argument or the ``SALIENCY_ROBUSTNESS_DEVICE`` variable
    (``cpu``, ``cuda``, ``cuda:1``); it is not part of the experiment's config. A
    ``torch.device`` is returned as it is.
    """
    if isinstance(requested, torch.device):
        return requested
    choice = (requested or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise PipelineError(f"{DEVICE_ENV}={choice!r} is not a device (use auto, cpu or cuda[:N])") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{DEVICE_ENV}={choice!r} asks for CUDA, but no GPU is visible")
    return device


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Turn TF32 off for matmuls and cuDNN convolutions (restored afterwards)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block (dropout off, batch norm frozen); every
    submodule's own train/eval flag is restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


#: environment variables that change which kernels the math libraries pick
MATH_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "DNNL_MAX_CPU_ISA")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith(("model name", "Hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    """A digest of the processor's feature flags (two CPUs sold under one name can differ)."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith(("flags", "Features")):
                return hashlib.sha256(" ".join(sorted(line.split(":", 1)[1].split())).encode()).hexdigest()[:12]
    return "unknown"


def _build_libraries() -> dict[str, str]:
    """BLAS, LAPACK and oneDNN as torch's build reports them (``torch.__config__.show()``)."""
    shown = torch.__config__.show()
    found = {key.lower(): value for key, value in re.findall(r"\b(BLAS_INFO|LAPACK_INFO)=([^,\s]+)", shown)}
    onednn = re.search(r"(?:oneDNN\)|MKL-DNN) (v[\d.]+)", shown)
    found["onednn"] = onednn.group(1) if onednn and torch.backends.mkldnn.is_available() else "none"
    mkl = re.search(r"Math Kernel Library Version ([\w.-]+)", shown)
    found["mkl"] = mkl.group(1) if mkl else "none"
    return found


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """What floating-point results depend on besides the code and the config: the processor
    and the kernels torch picks for it, torch and its build, the math libraries, the thread
    count and the device. Two runs agree bit for bit only where these agree (docs/spec.md §8);
    ``id`` is a short digest of all of them but the host name."""
    device = device or torch.device("cpu")
    record: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "torch_cuda_build": torch.version.cuda or "none",
        **_build_libraries(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "environment": {name: os.environ[name] for name in MATH_ENVIRONMENT if name in os.environ},
    }
    record["id"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    record["host"] = platform.node()
    return record


def configure_threads(threads: int) -> None:
    """Give torch exactly the cores Snakemake granted this job."""
    torch.set_num_threads(max(1, int(threads)))


def progress(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    """A progress bar on stderr; sparse updates when stderr is a log file, not a terminal."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", interactive)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)


def configure_logging(log_file: str | os.PathLike[str] | None = None, level: int = logging.INFO) -> None:
    """Log to ``log_file`` (the rule's ``log:``) and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)


@contextlib.contextmanager
def script_main(snakemake: Any) -> Iterator[Any]:
    """Wrap a Snakemake ``script:``: route logs and progress bars to its ``log:``, set threads,
    and turn a :class:`PipelineError` into one line on stderr and exit status 1."""
    log_file = snakemake.log[0] if len(snakemake.log) else None
    if log_file is not None:
        # progress bars and warnings go to the rule's log as well
        sys.stderr = open(log_file, "a", buffering=1)  # noqa: SIM115
    configure_logging(None)
    configure_threads(snakemake.threads)
    log.info("rule %s, wildcards %s, threads %d", snakemake.rule, dict(snakemake.wildcards), snakemake.threads)
    try:
        yield snakemake
    except PipelineError as exc:
        log.error("%s", exc)
        sys.__stderr__.write(f"error: {exc}\n")
        sys.exit(1)


def one_line_errors(func):  # noqa: ANN001, ANN201
    """Decorator for console entry points: a :class:`PipelineError` exits with one line."""

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        try:
            return func(*args, **kwargs)
        except PipelineError as exc:
            sys.exit(f"error: {exc}")

    wrapper.__doc__ = func.__doc__
    wrapper.__name__ = func.__name__
    return wrapper

