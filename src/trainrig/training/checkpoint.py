"""Checkpoints: written atomically (temp file + rename), read back with ``weights_only=True``.

A run's ``checkpoints/`` folder holds ``epoch=E-step=S.pt`` files (E: the epoch under way, 1-based; S: optimizer
steps done), ``last.pt`` (the newest) and ``best.pt`` (the best epoch end): the stable names are hard links
to a step file, so each save writes its bytes once. Resuming reads the newest readable one.

A sharded checkpoint (a strategy whose ranks each hold part of the weights) is a step file without the
model and optimizer, naming its ``epoch=E-step=S.dcp/`` folder (``SHARDS``), which holds them as
``torch.distributed.checkpoint`` wrote them, each rank its shard. The step file is written after every shard,
so a step file always names a complete folder; ``load`` reads the model from it on one process, at any
world size.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from trainrig.errors import CheckpointError


def atomic_write_bytes(path: str | Path, write: Any) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then rename it over ``path``.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | Path, key: str) -> None:
    """Before the work: can a file be written at ``path``? One line naming ``key`` and the path if not (a
    file where a folder should be, no permission, a read-only file system)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{key} {path}: is a folder; give a file name")
    folder = path.parent
    above = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        raise CheckpointError(f"{key} {path}: {above} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CheckpointError(f"{key} {path}: cannot write there ({reason}: {exc.filename or folder})") from None


def link_atomic(source: Path, target: Path) -> None:
    """Make ``target`` name the file ``source`` names (a hard link; a copy where links are not allowed),
    replacing any earlier ``target`` in one rename."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as src:
            atomic_write_bytes(tmp, lambda f: shutil.copyfileobj(src, f))
    os.replace(tmp, target)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically; a failed write (disk full, no permission) is one line naming the file,
    and whatever ``path`` held before stays as it was."""
    writer = _Writer()
    try:
        atomic_write_bytes(path, lambda f: torch.save(state, writer.on(f)))
    except RuntimeError:  # torch's zip writer turns a failed write into "unexpected pos ...": say why
        if writer.error is None:
            raise
        exc = writer.error
        raise CheckpointError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}); the files already in "
                              f"{Path(path).parent} are unchanged") from None
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
        raise CheckpointError(f"{path}: cannot write the checkpoint ({reason}); the files already in "
                              f"{Path(path).parent} are unchanged") from None


class _Writer:
    """A file's ``write`` that remembers the OSError (disk full, file too large) torch.save hides."""

    def __init__(self) -> None:
        self.file: Any = None
        self.error: OSError | None = None

    def on(self, file: Any) -> "_Writer":
        self.file = file
        return self

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


STEP_FILE = re.compile(r"^epoch=(\d+)-step=(\d+)\.pt$")


def step_file(folder: Path, epoch: int, step: int) -> Path:
    return folder / f"epoch={epoch}-step={step}.pt"


def step_files(folder: Path) -> list[tuple[int, int, Path]]:
    """The folder's epoch=E-step=S.pt files as (epoch, step, path), newest first."""
    found = [(int(m[1]), int(m[2]), p) for p in folder.glob("epoch=*-step=*.pt") if (m := STEP_FILE.match(p.name))]
    return sorted(found, key=lambda t: (t[1], t[0]), reverse=True)


def save_step(folder: Path, epoch: int, step: int, state: dict[str, Any], *, best: bool = False) -> Path:
    """Write epoch=E-step=S.pt, then point last.pt (and best.pt with ``best``) at it."""
    path = step_file(folder, epoch, step)
    save(path, state)
    try:
        link_atomic(path, folder / "last.pt")
        if best:
            link_atomic(path, folder / "best.pt")
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot update last.pt/best.pt ({exc.strerror or exc})") from None
    return path


def prune(folder: Path, keep_last: int, top_k: int, scores: dict[int, float], maximize: bool) -> None:
    """Delete the step files that are neither among the ``keep_last`` newest nor the end of one of the
    ``top_k`` best epochs (``scores``: finished epoch -> monitored value). last.pt / best.pt keep their own
    link to the file they name."""
    files = step_files(folder)
    keep = {p for _, _, p in files[:keep_last]}
    ends: dict[int, Path] = {}
    for epoch, _, path in files:  # newest first: an epoch's first file seen is its end
        if epoch in scores:
            ends.setdefault(epoch, path)
    ranked = sorted(ends, key=lambda e: (-scores[e] if maximize else scores[e], e))[:top_k]  # ties: the earlier
    # epoch, as best.pt takes it
    keep |= {ends[e] for e in ranked}
    for _, _, path in files:
        if path not in keep:
            path.unlink(missing_ok=True)
    _prune_shards(folder)


def _prune_shards(folder: Path) -> None:
    """Delete the shard folders no step file, last.pt or best.pt names any more."""
    found = [p for p in folder.glob(f"*{SHARDS_SUFFIX}") if p.is_dir()]
    if not found:
        return
    named = {p.with_suffix(SHARDS_SUFFIX).name for _, _, p in step_files(folder)}
    for link in (folder / "last.pt", folder / "best.pt"):
        if link.is_file():
            named.add(str(load(link, mmap=True).get(SHARDS, "")))
    for path in found:
        if path.name not in named:
            shutil.rmtree(path, ignore_errors=True)


def newest_readable(folder: Path) -> tuple[dict[str, Any], Path, list[str]]:
    """The newest checkpoint that loads: last.pt, then the step files newest first, then best.pt. Unreadable
    ones passed over are renamed <name>.unreadable (kept for a look, never tried again) and named in the
    returned warnings; when none loads, nothing is renamed."""
    candidates = [folder / "last.pt", *(p for _, _, p in step_files(folder)), folder / "best.pt"]
    bad: dict[tuple[int, int], Path] = {}
    reasons: list[str] = []
    for path in candidates:
        if not path.is_file():
            continue
        inode = (path.stat().st_dev, path.stat().st_ino)
        try:
            if inode in bad:
                raise CheckpointError(f"{path}: the same file as {bad[inode].name}")
            state = load(path, shards=False)
            if state.get(SHARDS):  # a sharded run's weights stay in their shards: their index must read
                _shard_metadata(path.parent / state[SHARDS])
        except CheckpointError as exc:
            bad[inode] = path
            reasons.append(str(exc))
            continue
        for old in set(bad.values()) | {p for p in candidates if p.is_file() and (p.stat().st_dev, p.stat().st_ino) in bad}:
            os.replace(old, old.with_name(old.name + ".unreadable"))
        same = [p for p in candidates[1:-1] if p.is_file() and p.samefile(path)]  # last.pt: name the step file it links to
        return state, same[0] if same else path, [f"skipped {r} (renamed *.unreadable)" for r in reasons]
    raise CheckpointError(f"{folder}: no readable checkpoint ({'; '.join(reasons) or 'none found'})")


def load(path: str | Path, *, mmap: bool = False, shards: bool = True) -> dict[str, Any]:
    """``mmap``: map the file instead of reading it, for a look at its small entries (config, epoch). A sharded
    checkpoint's model weights are read from its shard folder onto this one process, unless ``shards`` is
    false (or with ``mmap``): resuming reads its own part of them (the strategy)."""
    path = Path(path)
    if path.is_dir():
        found = next((p for p in (path / "checkpoints" / "best.pt", path / "best.pt") if p.is_file()), None)
        hint = f" such as {found}" if found else ""
        raise CheckpointError(f"{path}: is a folder; give a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and state.get(SHARDS) and shards and not mmap:
        state["model"] = read_sharded(path.parent / state[SHARDS], "model")
    return state


SHARDS = "sharded"  # a step file's key naming its shard folder
SHARDS_SUFFIX = ".dcp"


def shards_folder(path: Path) -> Path:
    """The shard folder of step file ``path`` (epoch=E-step=S.dcp beside it)."""
    return path.with_suffix(SHARDS_SUFFIX)


def read_sharded(folder: Path, key: str) -> dict[str, torch.Tensor]:
    """The full tensors under ``key`` (e.g. "model") of a torch.distributed.checkpoint folder, on this process
    alone (``no_dist``: whatever process group exists is not used), shaped from the folder's metadata."""
    import torch.distributed.checkpoint as dcp

    meta = _shard_metadata(folder)
    try:
        prefix = f"{key}."
        tensors = {name[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                   for name, m in meta.state_dict_metadata.items()
                   if name.startswith(prefix) and isinstance(m, dcp.metadata.TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: tensors}, checkpoint_id=str(folder), no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"{folder}: not a readable sharded checkpoint ({type(exc).__name__}: {exc})") from None
    return tensors


def _shard_metadata(folder: Path) -> Any:
    """The index torch.distributed.checkpoint wrote beside the shards (what each holds); CheckpointError when
    the folder is missing or damaged."""
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"{folder}: not a readable sharded checkpoint ({type(exc).__name__}: {exc})") from None


def copy_to(path: Path, folder: Path, name: str = "last.pt") -> Path:
    """Checkpoint ``path`` into ``folder`` as ``name``, with the shard folder it names: how a checkpoint leaves
    its run folder (a Tune report) and comes back (a restored trial). Hard links where the file system allows
    (checkpoint files are replaced by rename, never written in place), else copies."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    _link_or_copy(path, target)
    shards = load(path, mmap=True).get(SHARDS)
    if shards:
        shutil.copytree(path.parent / shards, folder / shards, copy_function=_link_or_copy, dirs_exist_ok=True)
    return target


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links, or another device
        shutil.copyfile(source, target)
