"""MMAR zips checked in full, then extracted beside the target and swapped in only when complete."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from engine.components import DEFAULT_TRUSTED_PACKAGES, code_at, expression_in_config, shorten
from engine.config import ConfigError, environment_problems
from engine.site.paths import SitePaths, check_run_number
from engine.site.policy import LivePolicy, SitePolicy, policy_source

__all__ = [
    "REQUIRED_CONFIGS",
    "DeployError",
    "check_zip",
    "code_refusal",
    "deploy_mmar",
    "extract_zip",
    "is_custom_code",
    "make_mmar_zip",
    "policy_refusal",
]

REQUIRED_CONFIGS = ("config/config_fed_client.json", "config/config_train.json")
MAX_RATIO = 200
RATIO_MIN_SIZE = 1 << 20  # small entries compress absurdly well (a file of zeros) and are harmless
MAX_CONFIG_BYTES = 16 << 20
_CHUNK = 1 << 20
_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# macOS Finder adds these to zips; they are never part of an MMAR.
_MAC_JUNK = "__MACOSX"


def is_custom_code(rel: str, size: int | None = None) -> bool:
    """Whether ``rel`` (a path inside an MMAR, with ``/``) is the MMAR's own code.

    Every file under ``custom/`` is: ``custom/`` is on the import path, so a ``README.py``
    imports as well as any module (and a ``.pyc`` or ``.so`` too). The one exception is an empty
    ``.gitkeep`` (``size`` 0), which holds nothing to run and keeps an empty ``custom/`` in git.
    """
    if not rel.startswith("custom/"):
        return False
    return not (rel.rsplit("/", 1)[-1] == ".gitkeep" and size == 0)


def code_refusal(
    mmar: Path,
    allow_byoc: bool,
    policy_file: object = None,
    *,
    trusted_packages: Iterable[str] = DEFAULT_TRUSTED_PACKAGES,
    allow_expressions: bool | None = None,
) -> str | None:
    """Why the site policy refuses this MMAR's own code or config expressions, or None: the one
    check of deploy, start, the training worker and ``check-config``.

    Own code is any file under ``custom/`` (``is_custom_code``) and any component in any of the
    MMAR's JSON configs (``config/`` and a bundle's ``configs/``, at any depth) that names code
    (``engine.components.code_at``: a ``path`` or bundle ``_target_`` outside the trusted
    packages or into one of their denied entry points, a loader told to unpickle). A config
    expression is a string ``engine.components.is_expression`` says is Python (``lambda ...``,
    a bundle's ``"$..."``), in any of those configs, YAML ones included. Nothing is imported
    or evaluated.

    Args:
        mmar: the MMAR folder.
        allow_byoc: the site policy's ``allow_byoc``.
        policy_file: where the policy came from, for the message.
        trusted_packages: the site policy's ``trusted_packages``.
        allow_expressions: the site policy's ``allow_expressions``; None: as ``allow_byoc``.
    """
    if allow_expressions is None:
        allow_expressions = allow_byoc
    if allow_byoc and allow_expressions:
        return None
    source = policy_source(policy_file) if isinstance(policy_file, Path) else policy_file
    where = f"refused by site policy ({source or 'defaults'}): "
    root = Path(mmar)
    custom = root / "custom"
    if not allow_byoc:
        for path in sorted(custom.rglob("*")) if custom.is_dir() else ():
            try:
                st = path.lstat()
            except OSError:
                continue
            rel = path.relative_to(root).as_posix()
            if not stat.S_ISDIR(st.st_mode) and is_custom_code(rel, st.st_size):
                return where + f"the MMAR has custom code ({rel}) and allow_byoc is false"
    trusted = tuple(trusted_packages)
    for config in _config_files(root):
        rel = config.relative_to(root).as_posix()
        try:
            text = config.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # an unreadable config is reported by the config check, with file and key
        if config.suffix != ".json":
            why = _yaml_refusal(text, allow_byoc, allow_expressions, trusted, custom)
            if why:
                return where + f"{rel} {why}"
            continue
        try:
            data = json.loads(text)
        except RecursionError:
            return where + f"{rel} is nested too deeply to be checked for code"
        except ValueError:
            continue  # a broken config is reported by the config check, with file and key
        try:
            found = None if allow_byoc else code_at(data, trusted=trusted, custom_dir=custom)
            expression = None if allow_expressions else expression_in_config(data)
        except RecursionError:
            return where + f"{rel} is nested too deeply to be checked for code"
        if found is not None:
            key, what, why = found
            return where + f"{rel} key {key} {why} ({what!r}) and allow_byoc is false"
        if expression is not None:
            key, text = expression
            return where + (
                f"{rel} key {key} is a Python expression ({shorten(text, 40)}) and "
                "allow_expressions is false"
            )
    return None


def policy_refusal(mmar: Path, policy: SitePolicy | LivePolicy) -> str | None:
    """``code_refusal`` under a site's whole policy (its BYOC, trusted packages, expressions);
    a LivePolicy is read once, as the file is now."""
    policy = policy.current()
    return code_refusal(
        mmar,
        policy.allow_byoc,
        policy.path,
        trusted_packages=policy.trusted_packages,
        allow_expressions=policy.expressions_allowed,
    )


# The folders an MMAR keeps its configs in: Clara's config/ and a MONAI bundle's configs/.
_CONFIG_DIRS = ("config", "configs")
#: A MONAI bundle's training config, which makes a zip an MMAR on its own.
BUNDLE_TRAIN = frozenset({"configs/train.json", "configs/train.yaml", "configs/train.yml"})
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
# In a YAML config (read as text: no YAML parser is needed to refuse): a value that is an
# expression, and a bundle component's _target_.
_YAML_EXPRESSION = re.compile(r"""(?m)(?:^|[:\-\[,{])\s*["']?\s*(?:\$|\(*\s*lambda(?![\w]))""")
_YAML_TARGET = re.compile(r"""(?m)["']?_target_["']?\s*:\s*["']?([^"'\s,}#]+)""")


def _config_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for name in _CONFIG_DIRS:
        folder = root / name
        if folder.is_dir() and not folder.is_symlink():
            files += [p for p in folder.rglob("*") if p.suffix in _CONFIG_SUFFIXES and p.is_file()]
    return sorted(files)


def _yaml_refusal(
    text: str, allow_byoc: bool, allow_expressions: bool, trusted: tuple[str, ...], custom: Path
) -> str | None:
    """Why a YAML config (a bundle's, read as text) is refused: a ``_target_`` that names code,
    or a line holding an expression; conservative, as no YAML parser is needed to refuse."""
    if not allow_byoc:
        for match in _YAML_TARGET.finditer(text):
            target = match.group(1)
            found = code_at({"_target_": target}, trusted=trusted, custom_dir=custom)
            if found is not None:
                return f"names code ({target!r}) and allow_byoc is false"
    expression = None if allow_expressions else _YAML_EXPRESSION.search(text)
    if expression is not None:
        line = text.count("\n", 0, expression.start()) + 1
        return (
            f"line {line} holds a Python expression ({shorten(text.splitlines()[line - 1], 40)})"
            " and allow_expressions is false"
        )
    return None


class DeployError(ValueError):
    """A zip or MMAR that cannot be deployed; nothing was written."""


def _norm(name: str) -> str:
    """The entry's path with "." and empty components dropped ("a//./b/" -> "a/b")."""
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _check_name(info: zipfile.ZipInfo) -> str:
    name = info.filename
    if not name:
        raise DeployError("the zip holds an entry with an empty name")
    if any(ord(c) < 32 for c in name):
        raise DeployError(f"entry {name!r}: control characters in the name are not allowed")
    if "\\" in name:
        raise DeployError(f"entry {name!r}: backslashes in names are not allowed")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DeployError(f"entry {name!r}: absolute paths are not allowed")
    if ".." in name.split("/"):
        raise DeployError(f"entry {name!r}: a '..' path component is not allowed")
    if info.flag_bits & 0x1:
        raise DeployError(f"entry {name!r}: encrypted entries are not supported")
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        raise DeployError(f"entry {name!r}: symbolic links are not allowed")
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        what = {
            stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device",
            stat.S_IFIFO: "a FIFO",
            stat.S_IFSOCK: "a socket",
        }.get(kind, f"a special file (mode {mode:o})")
        raise DeployError(f"entry {name!r}: {what} is not allowed")
    norm = _norm(name)
    if not norm and not info.is_dir():
        raise DeployError(f"entry {name!r}: a file entry needs a name")
    return norm


def _open(data: bytes) -> zipfile.ZipFile:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DeployError(f"expected the zip as bytes, got {type(data).__name__}")
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise DeployError(f"not a zip file ({len(data)} bytes): {exc}") from None


def _check(zf: zipfile.ZipFile, max_bytes: int, max_files: int) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > max_files:
        raise DeployError(f"the zip holds {len(infos)} entries; at most {max_files} are allowed")
    seen: dict[str, str] = {}
    files: set[str] = set()
    total = 0
    for info in infos:
        norm = _check_name(info)
        if norm:
            if norm in seen:
                raise DeployError(
                    f"entry {info.filename!r}: duplicates entry {seen[norm]!r} ({norm})"
                )
            seen[norm] = info.filename
            if not info.is_dir():
                files.add(norm)
        if info.is_dir():
            continue
        total += info.file_size
        if total > max_bytes:
            raise DeployError(
                f"entry {info.filename!r}: the zip's declared size reaches {total} bytes, over "
                f"the limit of {max_bytes} bytes"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_MIN_SIZE and ratio > MAX_RATIO:
            raise DeployError(
                f"entry {info.filename!r} looks like a zip bomb: {info.file_size} bytes from "
                f"{info.compress_size} compressed (ratio {ratio:.0f} > {MAX_RATIO})"
            )
    # A file "a" and an entry "a/b" cannot both be extracted.
    for norm, original in seen.items():
        parts = norm.split("/")
        for k in range(1, len(parts)):
            parent = "/".join(parts[:k])
            if parent in files:
                raise DeployError(
                    f"entry {original!r}: lies under {seen[parent]!r}, which is a file"
                )
    return infos


def check_zip(data: bytes, max_bytes: int, max_files: int = 10_000) -> list[zipfile.ZipInfo]:
    """Checks every entry of a zip before anything is extracted.

    Refused: data that is not a zip, more than ``max_files`` entries, empty or absolute names
    (``/x``, ``C:\\x``, ``\\\\x``), backslashes, ``..`` components, duplicate names after
    normalisation, symlinks, devices, FIFOs and sockets, encrypted entries, a total declared
    size over ``max_bytes``, and entries over 1 MiB that claim a compression ratio over 200.

    Args:
        data: the zip file's bytes.
        max_bytes: the most bytes the extracted files may hold together.
        max_files: the most entries the zip may hold.

    Returns:
        The zip's entries, in archive order.

    Raises:
        DeployError: the zip is refused; the text names the entry.
    """
    with _open(data) as zf:
        return _check(zf, max_bytes, max_files)


def _cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _extract(
    zf: zipfile.ZipFile,
    members: Sequence[tuple[zipfile.ZipInfo, str]],
    dest: Path,
    max_bytes: int,
    verify: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Extracts ``(entry, relative path)`` pairs to ``dest``, replacing it only on success.

    ``verify(tree)`` may refuse the extracted tree (by raising) before it replaces ``dest``.
    """
    dest = Path(dest)
    # Parent folders this call creates go again when it fails: a failed deploy writes nothing.
    created: list[Path] = []
    parent = dest.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    written = 0
    out: list[Path] = []
    try:
        for info, rel in members:
            target = tmp / rel
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "xb") as dst:
                    while chunk := src.read(_CHUNK):
                        # Count what really comes out: the sizes in the headers may lie.
                        written += len(chunk)
                        if written > max_bytes:
                            raise DeployError(
                                f"entry {info.filename!r}: extracting went past the limit of "
                                f"{max_bytes} bytes (the zip's headers understate its size)"
                            )
                        dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                raise DeployError(f"entry {info.filename!r} cannot be extracted: {exc}") from None
            out.append(dest / rel)
        if verify is not None:
            verify(tmp)
        _swap(tmp, dest)
    except BaseException:
        _cleanup(tmp)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return out


def _swap(new: Path, dest: Path) -> None:
    """Puts ``new`` at ``dest``; an old ``dest`` is removed only once the new one is in place."""
    if not (dest.exists() or dest.is_symlink()):
        os.rename(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    aside = old / dest.name
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)
        _cleanup(old)
        raise
    _cleanup(old)


def extract_zip(data: bytes, dest: Path, max_bytes: int, max_files: int = 10_000) -> list[Path]:
    """Checks a zip in full, then extracts it to ``dest``, replacing what was there.

    The files are written to a temporary folder beside ``dest`` (counting the bytes actually
    written, which must stay within ``max_bytes`` even when the headers lie); only when all are
    written does the new folder replace ``dest``. A failure leaves an old ``dest`` as it was and
    writes nothing there.

    Args:
        data: the zip file's bytes.
        dest: the folder to create or replace.
        max_bytes: the most bytes the extracted files may hold together.
        max_files: the most entries the zip may hold.

    Returns:
        The extracted files' paths under ``dest``, in archive order.

    Raises:
        DeployError: the zip is refused or cannot be extracted.
    """
    with _open(data) as zf:
        infos = _check(zf, max_bytes, max_files)
        members = [(info, _norm(info.filename)) for info in infos if _norm(info.filename)]
        return _extract(zf, members, Path(dest), max_bytes)


def _mmar_members(infos: list[zipfile.ZipInfo]) -> list[tuple[zipfile.ZipInfo, str]]:
    """Maps entries to MMAR-relative paths, stripping one common top folder when there is one."""
    members = []
    for info in infos:
        norm = _norm(info.filename)
        if norm and norm.split("/")[0] != _MAC_JUNK and norm.rsplit("/", 1)[-1] != ".DS_Store":
            members.append((info, norm))
    names = {rel for info, rel in members if not info.is_dir()}
    if REQUIRED_CONFIGS[0] in names or REQUIRED_CONFIGS[1] in names or names & BUNDLE_TRAIN:
        return members
    tops = {rel.split("/")[0] for _, rel in members}
    if len(tops) == 1:
        top = tops.pop()
        if top not in names:  # a folder, not a lone file
            prefix = top + "/"
            return [(i, rel[len(prefix) :]) for i, rel in members if rel.startswith(prefix)]
    return members


def deploy_mmar(
    data: bytes,
    workspace: Path,
    run_number: int,
    site: str,
    *,
    max_bytes: int,
    allow_byoc: bool,
    policy_file: object = None,
    trusted_packages: Iterable[str] = DEFAULT_TRUSTED_PACKAGES,
    allow_expressions: bool | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Deploys an MMAR zip to ``<workspace>/run_<N>/mmar_<site>``.

    The MMAR's files may lie at the top of the zip or under one top folder (stripped). It must
    hold ``config/config_fed_client.json`` and ``config/config_train.json`` (JSON objects). Its
    own code (``code_refusal``: any file under ``custom/``, any component that names code by
    path outside the trusted packages) needs ``allow_byoc``, its config expressions need
    ``allow_expressions``, and the folders it would have the site write
    (``environment.json``'s MMAR_CKPT_DIR, MMAR_EVAL_OUTPUT_PATH) must stay inside it. All is
    checked before the MMAR replaces anything; an earlier deployment is replaced only on success.

    Args:
        data: the MMAR zip's bytes.
        workspace: the site's workspace.
        run_number: the run, an int >= 1.
        site: this site's name.
        max_bytes: the most bytes the extracted MMAR may hold.
        allow_byoc: whether the site's policy lets custom code run.
        policy_file: where the policy came from, for a refusal.
        trusted_packages: the policy's ``trusted_packages`` (``code_refusal``).
        allow_expressions: the policy's ``allow_expressions``; None: as ``allow_byoc``.

    Returns:
        The deployed MMAR's folder.

    Raises:
        DeployError: the MMAR is refused or cannot be extracted; the text says why.
    """
    try:
        check_run_number(run_number)
    except ValueError as exc:
        raise DeployError(str(exc)) from None
    if not isinstance(site, str) or not _SITE_RE.match(site):
        raise DeployError(
            f"site name {site!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' and '-'"
        )
    with _open(data) as zf:
        infos = _check(zf, max_bytes, 10_000)
        members = _mmar_members(infos)
        by_name = {rel: info for info, rel in members if not info.is_dir()}
        bundle = sorted(BUNDLE_TRAIN & set(by_name))
        required = [*bundle[:1], *REQUIRED_CONFIGS[:1]] if bundle else list(REQUIRED_CONFIGS)
        if bundle and REQUIRED_CONFIGS[0] not in by_name:
            required = bundle[:1]  # a MONAI bundle deployed as it is
        missing = [c for c in required if c not in by_name]
        if missing:
            raise DeployError(
                f"the MMAR lacks {' and '.join(missing)} (an MMAR needs "
                f"{' and '.join(REQUIRED_CONFIGS)}, or is a MONAI bundle with "
                "configs/train.json; at the top of the zip or under one folder)"
            )
        for config in required:
            if config.endswith(".json"):
                _check_config(zf, by_name[config], config)
        custom = sorted(rel for rel, i in by_name.items() if is_custom_code(rel, i.file_size))
        if custom and not allow_byoc:
            shown = ", ".join(custom[:5]) + (
                f" and {len(custom) - 5} more" if len(custom) > 5 else ""
            )
            raise DeployError(
                f"the MMAR contains custom code under custom/ ({shown}), which this site's "
                "policy (allow_byoc=false in startup/site_policy.json) does not allow"
            )

        def verify(tree: Path) -> None:
            # The extracted tree, before it replaces anything: the same checks as start and the
            # worker make (code by path anywhere in the configs; paths that stay in the MMAR).
            refusal = code_refusal(
                tree,
                allow_byoc,
                policy_file,
                trusted_packages=trusted_packages,
                allow_expressions=allow_expressions,
            )
            if refusal:
                raise DeployError(refusal)
            _check_environment(tree)
            if check is not None:
                # What start would find (forms, components, MONAI installed): refused now, with
                # the reason, rather than at start.
                try:
                    check(tree)
                except ConfigError as exc:
                    raise DeployError(f"the MMAR cannot run on this site: {exc}") from None

        dest = SitePaths(Path(workspace)).mmar(run_number, site)
        _extract(zf, members, dest, max_bytes, verify)
    return dest


def _check_environment(tree: Path) -> None:
    problems = environment_problems(tree)
    if problems:
        lines = [
            f"config/environment.json: {p.key}: {p.problem}"
            for one in problems
            for p in getattr(one, "problems", [one])
        ]
        raise DeployError("the MMAR's " + "; ".join(lines))


def _check_config(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> None:
    if info.file_size > MAX_CONFIG_BYTES:
        raise DeployError(f"the MMAR's {name} is {info.file_size} bytes, too large for a config")
    try:
        with zf.open(info) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise DeployError(f"the MMAR's {name} cannot be read: {exc}") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DeployError(f"the MMAR's {name} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DeployError(
            f"the MMAR's {name} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    if not isinstance(value, dict):
        raise DeployError(f"the MMAR's {name} must be a JSON object, got {type(value).__name__}")


def make_mmar_zip(folder: Path) -> bytes:
    """Zips a folder (its contents at the top of the zip), as the server does for deploy.

    Args:
        folder: the MMAR folder.

    Returns:
        The zip's bytes; empty folders are kept as folder entries.

    Raises:
        DeployError: ``folder`` is not a folder, or holds a symlink or special file (a symlink
            could carry files from outside the MMAR to every site).
    """
    root = Path(folder)
    if not root.is_dir():
        raise DeployError(f"{root} is not a folder")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            here = Path(dirpath)
            for name in sorted(dirnames) + sorted(filenames):
                path = here / name
                rel = path.relative_to(root).as_posix()
                if path.is_symlink():
                    raise DeployError(f"{path} is a symlink; an MMAR may hold only plain files")
                if path.is_dir():
                    if not any(path.iterdir()):
                        zf.write(path, rel + "/")
                elif path.is_file():
                    zf.write(path, rel)
                else:
                    raise DeployError(f"{path} is not a plain file")
    return buf.getvalue()
