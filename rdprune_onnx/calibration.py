"""Calibration data: loading, generating and checking it against the model's inputs.

A calibration set is a mapping from input name to an array whose first axis is the sample
axis. :func:`batches` cuts it into the dicts of arrays that a session is fed.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from rdprune_onnx.errors import UserError

log = logging.getLogger(__name__)

Dim = int | str | None  # fixed size, symbolic name, or unknown


@dataclass(frozen=True)
class InputSpec:
    """One real input of the model (initializers listed as inputs are not real inputs)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None  # None when the rank is unknown

    def describe(self) -> str:
        if self.shape is None:
            dims = "?"
        else:
            dims = "x".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype.name}[{dims}]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise UserError(
                f"model input {value.name!r} is not a tensor",
                "only tensor inputs are supported (no sequences, maps or optionals)",
            )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape: tuple[Dim, ...] | None = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor_type.shape.dim
            )
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def describe_inputs(specs: Sequence[InputSpec]) -> str:
    return "; ".join(s.describe() for s in specs)


def parse_input_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``name:1x3x224x224`` items (as given to ``--input-shape``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise UserError(
                f"cannot read input shape {item!r}", "write NAME:DIMS, e.g. input:1x3x224x224"
            )
        shapes[name] = shape
    return shapes


def parse_input_ranges(items: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Parse ``name:low:high`` items (as given to ``--input-range``)."""
    ranges: dict[str, tuple[float, float]] = {}
    for item in items:
        parts = item.rsplit(":", 2)
        try:
            name, low, high = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise UserError(
                f"cannot read input range {item!r}", "write NAME:LOW:HIGH, e.g. input_ids:0:30522"
            ) from None
        if not high > low:
            raise UserError(f"input range {item!r} is empty", "HIGH must be above LOW")
        ranges[name] = (low, high)
    return ranges


def parse_input_values(items: Sequence[str]) -> dict[str, float]:
    """Parse ``NAME=VALUE`` items (as given to ``--input-value``)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not name or not np.isfinite(number):
            raise UserError(
                f"cannot read input value {item!r}", "write NAME=VALUE, e.g. --input-value sr=16000"
            )
        out[name] = number
    return out


def check_informative(
    data: Mapping[str, np.ndarray], source: str, fixed: Sequence[str] = ()
) -> None:
    """Refuse calibration data that cannot measure anything: every input (other than those
    fixed on purpose, and per-sample scalars such as a sample rate) holds one single
    value. Warn when some of them do."""
    checked = {
        name: array
        for name, array in data.items()
        if name not in fixed and array.ndim >= 1 and array.size > max(array.shape[0], 1)
    }
    constant = [
        name for name, array in checked.items() if array.size and np.ptp(array.reshape(-1)) == 0
    ]
    if checked and len(constant) == len(checked):
        raise UserError(
            f"{source}: every input holds one constant value ({', '.join(constant)}); curves "
            "measured on it cannot tell the layers apart and the pruned model would break",
            "use real samples (--data) or random ones (--synthetic N)",
        )
    if constant:
        log.warning(
            "%s: input(s) %s hold one constant value; the curves only reflect that value",
            source,
            ", ".join(constant),
        )


def _check_finite(name: str, array: np.ndarray, source: str) -> None:
    if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise UserError(
            f"{source}: input {name!r} contains {bad} NaN or Inf values",
            "clean the calibration data",
        )


def memory_budget() -> int:
    """Bytes an .npz may unpack to: ``RDPRUNE_MAX_DATA_BYTES``, else half the memory."""
    env = os.environ.get("RDPRUNE_MAX_DATA_BYTES")
    if env and env.isdigit():
        return int(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def check_npz_sizes(path: Path, budget: int | None = None) -> None:
    """Read every member's .npy header (nothing else) and refuse, before loading anything,
    a member whose header declares more data than the member holds, or an archive that
    would unpack to more than the memory budget (a decompression bomb)."""
    budget = memory_budget() if budget is None else budget
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                    header = fh.tell()
                name = info.filename.removesuffix(".npy")
                if dtype.hasobject:
                    continue  # refused as pickled when loaded
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > info.file_size - header:
                    raise UserError(
                        f"array {name!r} in {str(path)!r} declares shape {tuple(shape)} "
                        f"({declared} bytes) but holds {info.file_size - header} bytes",
                        "the file is corrupt or truncated; save it again with numpy.savez",
                    )
                total += declared
    except (
        ValueError,
        OSError,
        zipfile.BadZipFile,
        EOFError,
        RuntimeError,
        NotImplementedError,
    ) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression.
        raise UserError(
            f"cannot read {str(path)!r} as .npz ({type(exc).__name__}: {str(exc)[:120]})",
            "save it with numpy.savez",
        ) from None
    if total > budget:
        raise UserError(
            f"{str(path)!r} unpacks to {total / 1024**3:.1f} GiB, more than the memory budget "
            f"of {budget / 1024**3:.1f} GiB",
            "use fewer samples, or raise RDPRUNE_MAX_DATA_BYTES",
        )


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"calibration file {str(p)!r} does not exist", "check the --data path")
    if not zipfile.is_zipfile(p):
        raise UserError(f"cannot read {str(p)!r}: not an .npz archive", "save it with numpy.savez")
    check_npz_sizes(p)
    try:
        with np.load(p, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UserError(
                f"calibration file {str(p)!r} holds pickled objects, which are not loaded",
                "save plain numeric arrays with numpy.savez",
            ) from None
        raise UserError(
            f"cannot read {str(p)!r} as .npz ({exc})", "save it with numpy.savez"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as exc:
        raise UserError(
            f"cannot read {str(p)!r} as .npz ({type(exc).__name__})", "save it with numpy.savez"
        ) from None


def load_labelled(
    path: str | os.PathLike[str], labels: str | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The arrays of a held-out .npz, with the array named ``labels`` (``--labels``) taken
    out of them (None when not asked for)."""
    raw = load_npz(path)
    if labels is None:
        return raw, None
    if labels not in raw:
        raise UserError(
            f"{str(path)!r} has no array {labels!r}",
            f"it has {', '.join(map(repr, sorted(raw))) or 'nothing'}; pass one as --labels",
        )
    return raw, raw.pop(labels)


def check_data(
    data: Mapping[str, np.ndarray], specs: Sequence[InputSpec], source: str
) -> dict[str, np.ndarray]:
    """Check names, dtypes and shapes against the model; return the arrays for its inputs."""
    expected = describe_inputs(specs)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in data]
    if missing:
        raise UserError(
            f"{source} lacks input(s) {', '.join(map(repr, missing))}; it has "
            f"{', '.join(map(repr, sorted(data))) or 'nothing'}",
            f"the model expects {expected}",
        )
    out: dict[str, np.ndarray] = {}
    count: int | None = None
    for spec in specs:
        array = np.asarray(data[spec.name])
        _check_input(spec, array, source, expected)
        if spec.shape == ():
            out[spec.name] = array
            continue
        if count is not None and array.shape[0] != count:
            raise UserError(
                f"{source}: inputs have different sample counts ({count} vs {array.shape[0]} "
                f"for {spec.name!r})",
                "every array needs the same first-axis length",
            )
        count = array.shape[0]
        _check_finite(spec.name, array, source)
        out[spec.name] = array
    if count == 0:
        raise UserError(f"{source} holds no samples", "give at least one sample per input")
    return out


def _check_input(spec: InputSpec, array: np.ndarray, source: str, expected: str) -> None:
    """One array against the model's input ``spec``: dtype, then rank and fixed dimensions
    (``expected``: all the model's inputs, for the hints)."""
    if array.dtype != spec.dtype:
        raise UserError(
            f"{source}: input {spec.name!r} has dtype {array.dtype.name}, "
            f"the model expects {spec.dtype.name}",
            f"convert it (model inputs: {expected})",
        )
    if spec.shape == ():
        # A scalar input (a flag, a threshold) has no sample axis: the same value is fed
        # with every batch.
        if array.ndim != 0:
            raise UserError(
                f"{source}: input {spec.name!r} is a scalar in the model, got {array.shape}",
                f"store a 0-d array (model inputs: {expected})",
            )
        return
    if array.ndim == 0:
        raise UserError(
            f"{source}: input {spec.name!r} is a scalar; the first axis must be samples",
            f"model inputs: {expected}",
        )
    if spec.shape is None:
        return
    sample_dims = array.shape[1:]
    model_dims = spec.shape[1:]
    ok = len(sample_dims) == len(model_dims) and all(
        not isinstance(m, int) or m == 0 or m == d
        for m, d in zip(model_dims, sample_dims, strict=True)
    )
    if not ok:
        raise UserError(
            f"{source}: input {spec.name!r} has samples of shape "
            f"{'x'.join(map(str, sample_dims)) or 'scalar'} (array {array.shape}), "
            f"the model expects {spec.describe()}",
            "the first axis of each array is the sample axis",
        )


def synthesize(
    specs: Sequence[InputSpec],
    samples: int,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    seed: int = 0,
    values: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Random calibration inputs: standard normal for float inputs (the paper's zero-data
    mode), uniform integers in an explicit range for integer inputs.

    The first axis is the sample axis; the other dimensions come from the model, with
    ``shapes`` (``--input-shape``) filling dynamic ones.
    """
    if samples <= 0:
        raise UserError(f"--synthetic must be positive, got {samples}", "e.g. --synthetic 64")
    shapes = dict(shapes or {})
    ranges = dict(ranges or {})
    fixed = dict(values or {})
    names = {s.name for s in specs}
    for name in list(shapes) + list(ranges) + list(fixed):
        if name not in names:
            raise UserError(
                f"the model has no input named {name!r}", f"inputs: {describe_inputs(specs)}"
            )
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        dims = _sample_dims(spec, shapes)
        shape = (samples, *dims) if spec.shape != () else ()
        out[spec.name] = _draw(spec, shape, rng, ranges, fixed)
    return out


def _sample_dims(spec: InputSpec, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The dimensions after the sample axis of a synthetic ``spec``: from ``shapes``
    (``--input-shape``, which must keep the model's fixed dimensions) or the model."""
    if spec.name in shapes:
        given = shapes[spec.name]
        if spec.shape is not None and (
            len(given) != len(spec.shape)
            or any(
                isinstance(m, int) and m > 0 and m != g
                for m, g in zip(spec.shape[1:], given[1:], strict=True)
            )
        ):
            raise UserError(
                f"--input-shape {spec.name}:{'x'.join(map(str, given))} does not fit "
                f"the model's {spec.describe()}",
                "keep the model's fixed dimensions",
            )
        return given[1:]
    if spec.shape == ():
        return ()
    if spec.shape is None or any(not isinstance(d, int) or d <= 0 for d in spec.shape[1:]):
        raise UserError(
            f"input {spec.describe()} has dynamic dimensions",
            f"give them with --input-shape {spec.name}:1x... or use --data",
        )
    return tuple(int(d) for d in spec.shape[1:] if isinstance(d, int))


def _draw(
    spec: InputSpec,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    ranges: Mapping[str, tuple[float, float]],
    fixed: Mapping[str, float],
) -> np.ndarray:
    """One synthetic input: ``fixed`` value (``--input-value``), standard normal floats, or
    uniform integers in ``ranges`` (``--input-range``; booleans default to 0/1)."""
    if spec.name in fixed:  # --input-value: the same value everywhere
        return np.full(shape, fixed[spec.name]).astype(spec.dtype)
    if spec.dtype.kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype.kind not in "iub":
        raise UserError(
            f"input {spec.describe()} cannot be synthesized", "use --data with real inputs"
        )
    if spec.dtype.kind == "b":
        low, high = ranges.get(spec.name, (0, 2))
    elif spec.name in ranges:
        low, high = ranges[spec.name]
    else:
        raise UserError(
            f"integer input {spec.describe()} cannot be synthesized without a range",
            f"pass --input-range {spec.name}:LOW:HIGH or use --data",
        )
    drawn = rng.integers(int(low), int(high), size=shape)
    return drawn.astype(spec.dtype)


def sample_count(data: Mapping[str, np.ndarray]) -> int:
    batched = [v for v in data.values() if v.ndim]
    return int(batched[0].shape[0]) if batched else 1


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch size the model fixes in its first dimension, if any."""
    fixed = {
        s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0
    }
    return fixed.pop() if len(fixed) == 1 else None


def fit_fixed_batch(
    data: Mapping[str, np.ndarray], specs: Sequence[InputSpec], batch_size: int
) -> tuple[dict[str, np.ndarray], int]:
    """The data and batch size to run a model with a fixed batch dimension, if it has one.

    Such a model takes exactly its batch size per run: samples that do not fill a last
    batch are dropped (with a warning).
    """
    fixed = fixed_batch(specs)
    if fixed is None:
        return dict(data), batch_size
    n = sample_count(data)
    if n < fixed:
        raise UserError(
            f"the model's batch dimension is fixed at {fixed}, but only {n} samples given",
            f"give at least {fixed} samples",
        )
    if n % fixed:
        log.warning("dropping %d samples that do not fill a batch of %d", n % fixed, fixed)
        data = {k: v[: n - n % fixed] if v.ndim else v for k, v in data.items()}
    return dict(data), fixed


def batches(data: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    n = sample_count(data)
    for start in range(0, n, batch_size):
        yield {
            k: np.ascontiguousarray(v[start : start + batch_size]) if v.ndim else v
            for k, v in data.items()
        }
