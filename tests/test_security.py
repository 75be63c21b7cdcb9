"""Security: the embedded Ray listens on loopback only; nothing read back from a store, a model
directory, a checkpoint or an input file is unpickled (JSON and raw arrays only); paths in a
config cannot leave the config's directory; replacing a store takes an explicit flag; no
credentials in the repository. Token authentication and the dashboard binding of the deploy
configs are checked in tests/test_deploy.py; a token-protected job API in tests/test_ray_job.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ntk_scale import FullyConnected
from ntk_scale.cli import main
from ntk_scale.config import load_config, resolve_path
from ntk_scale.io import load_array, load_targets
from ntk_scale.linalg.checkpoint import load_checkpoint
from ntk_scale.model import load_model, save_model
from ntk_scale.solve import CHECKPOINT_NAME, solve_store
from ntk_scale.store import GramStore, StoreMismatchError

REPO = Path(__file__).resolve().parents[1]
SPEC = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)
KERNEL = ["--W-std", "1.4", "--b-std", "0.1", "--dtype", "float64"]


# -- the embedded Ray binds 127.0.0.1 -----------------------------------------------------------
def _decode(hex_addr: str) -> tuple[ipaddress._BaseAddress, int]:
    """An address of /proc/net/tcp{,6}: 32-bit words printed in host byte order, then the port."""
    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port_hex, 16)


def _listening() -> dict[str, tuple[ipaddress._BaseAddress, int]]:
    """Listening TCP sockets of this network namespace, by socket inode."""
    out = {}
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if path.exists():
            for line in path.read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A":  # TCP_LISTEN
                    out[f[9]] = _decode(f[1])
    return out


def _process_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def _sockets_of(pids: list[int]) -> list[tuple[int, str, ipaddress._BaseAddress, int]]:
    listening, found = _listening(), []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            inode = target[len("socket:[") : -1] if target.startswith("socket:[") else None
            if inode in listening:
                found.append((pid, name, *listening[inode]))
    return found


def _is_loopback(ip: ipaddress._BaseAddress) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc")
def test_embedded_ray_listens_on_loopback_only(ray_local):
    ray = ray_local
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    gcs_host, gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    assert gcs_host == "127.0.0.1"
    # Every listening socket of this process and its descendants (GCS, raylet, agents, workers).
    sockets = _sockets_of(_process_tree(os.getpid()))
    assert int(gcs_port) in {port for *_, port in sockets}, "did not see the GCS listening"
    public = [s for s in sockets if not _is_loopback(s[2])]
    assert not public, f"listening beyond loopback: {public}"


# -- nothing read back is unpickled -------------------------------------------------------------
class _Payload:
    """Unpickling this creates the file ``path``: the proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def artifacts(tmp_path):
    """A Gram store (tiles written here, no Ray), a model directory, a PCG checkpoint, inputs."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    url = str(tmp_path / "g.zarr")
    diag = SPEC.diag(x, dtype="float64")
    store = GramStore.create(url, SPEC, x, dtype="float64", tile=16, diag=diag)
    K = SPEC.kernel(x, dtype="float64")
    for t in store.plan.tiles():
        store.write_tile(t, K[t.rows, t.cols])
    report = solve_store(url, y, preconditioner="jacobi", tol=1e-8, out_dir=str(tmp_path / "ck"))
    model = str(tmp_path / "model")
    save_model(model, report.result.x, {"store": url, "store_fingerprint": store.fingerprint})
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    (tmp_path / "fit.toml").write_text(
        '[data]\nx_train = "x.npy"\ny_train = "x.npy"\n[store]\npath = "g.zarr"\n'
        '[output]\ndir = "out"\n'
    )
    return {
        "root": tmp_path,
        "store": url,
        "model": model,
        "checkpoint": str(tmp_path / "ck" / CHECKPOINT_NAME),
        "K": K,
    }


@pytest.fixture
def no_pickle(monkeypatch):
    """Fail on any unpickling through the pickle module, or np.load with allow_pickle."""

    def refuse(*args, **kwargs):
        raise AssertionError("something read back was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    real_load = np.load

    def np_load(*args, allow_pickle=False, **kwargs):
        assert not allow_pickle, "np.load(allow_pickle=True)"
        return real_load(*args, allow_pickle=False, **kwargs)

    monkeypatch.setattr(np, "load", np_load)


def test_reading_every_artifact_never_unpickles(artifacts, no_pickle):
    a = artifacts
    store = GramStore.open(a["store"])
    assert store.verify().ok
    blocks = range(store.plan.row_blocks)
    full = np.block([[store.block(i, j) for j in blocks] for i in blocks])
    np.testing.assert_array_equal(full, a["K"])  # (dask's own tokenizer round-trips pickles)
    assert store.x_block("rows", 1).shape == (16, 3) and store.diagonal().shape == (40,)
    model = load_model(a["model"], store)
    state = load_checkpoint(a["checkpoint"], {})
    np.testing.assert_array_equal(state.x, model.alpha)
    root = a["root"]
    assert load_array(str(root / "x.npy")).shape == (40, 3)
    assert load_array(f"{root / 'x.npz'}:x").shape == (40, 3)
    assert load_targets(str(root / "x.npy")).shape == (40, 3)
    assert load_config(str(root / "fit.toml")).store == a["store"]


def test_a_checkpoint_carrying_a_pickle_is_refused(artifacts):
    path, marker = Path(artifacts["checkpoint"]), artifacts["root"] / "ran"
    with np.load(path) as z:
        genuine = {k: z[k] for k in z.files}
    for field in ("x", "__meta__"):  # an object array where an array / the JSON metadata goes
        np.savez(path, **{**genuine, field: np.array([_Payload(marker)], dtype=object)})
        with pytest.raises(ValueError, match="allow_pickle"):
            load_checkpoint(str(path), {})
        assert not marker.exists(), f"the pickle in {field} ran"


def test_input_files_carrying_a_pickle_are_refused(artifacts, capsys):
    root, marker = artifacts["root"], artifacts["root"] / "ran"
    evil = np.array([_Payload(marker)] * 3, dtype=object)
    np.save(root / "evil.npy", evil)
    np.savez(root / "evil.npz", x=evil)
    for spec in (str(root / "evil.npy"), f"{root / 'evil.npz'}:x"):
        with pytest.raises(ValueError):
            np.asarray(load_array(spec))
        assert main(["gram", "--x", spec, "--store", str(root / "e.zarr")]) == 2
        assert not marker.exists(), f"the pickle in {spec} ran"
    assert not (root / "e.zarr").exists()


def _replace_with_pickled_v2_array(directory: Path, marker: Path) -> None:
    """Swap a Zarr array for a Zarr v2 one whose codec is numcodecs' pickle, payload inside."""
    shutil.rmtree(directory)
    directory.mkdir()
    zarray = {
        "zarr_format": 2,
        "shape": [4],
        "chunks": [4],
        "dtype": "<f8",
        "compressor": {"id": "pickle", "protocol": 4},
        "fill_value": 0.0,
        "filters": None,
        "order": "C",
        "dimension_separator": ".",
    }
    (directory / ".zarray").write_text(json.dumps(zarray))
    (directory / "0").write_bytes(pickle.dumps(_Payload(marker)))


def test_zarr_arrays_with_a_pickle_codec_are_refused(artifacts):
    marker = artifacts["root"] / "ran"
    model = Path(artifacts["model"])
    _replace_with_pickled_v2_array(model / "alpha", marker)
    with pytest.raises(Exception):  # noqa: B017 - whichever error, as long as nothing ran
        load_model(str(model))
    assert not marker.exists(), "the model's pickle codec ran"

    x_rows = Path(artifacts["store"]) / "x_rows"
    meta = json.loads((x_rows / "zarr.json").read_text())
    meta["codecs"] = [{"name": "numcodecs.pickle", "configuration": {"protocol": 4}}]
    (x_rows / "zarr.json").write_text(json.dumps(meta))
    for chunk in (x_rows / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Exception):  # noqa: B017
        GramStore.open(artifacts["store"]).x_block("rows", 0)
    assert not marker.exists(), "the store's pickle codec ran"


# -- config paths stay inside the config's directory --------------------------------------------
def _write_config(directory: Path, **overrides: str) -> Path:
    values = {
        "data.x_train": "data/x.npy",
        "data.y_train": "data/y.npy",
        "store.path": "gram.zarr",
        "output.dir": "out",
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, []).append(f"{name} = {json.dumps(value)}")
    text = "\n".join(f"[{s}]\n" + "\n".join(lines) for s, lines in sections.items())
    path = directory / "fit.toml"
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize(
    "key, value",
    [
        ("data.x_train", "../outside.npy"),
        ("data.y_train", "data/../../outside.npy"),
        ("store.path", "/tmp/gram.zarr"),
        ("output.dir", "../out"),
        ("output.dir", "link/out"),  # a symlink inside that points outside
    ],
)
def test_config_paths_cannot_escape_its_directory(tmp_path, capsys, key, value):
    cfg_dir = tmp_path / "cfg"
    (cfg_dir / "data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (cfg_dir / "link").symlink_to(tmp_path / "elsewhere")
    path = _write_config(cfg_dir, **{key.replace(".", "__"): value})
    with pytest.raises(ValueError, match=re.escape(key)):
        load_config(str(path))
    assert main(["fit", str(path)]) == 2
    assert key in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg", "elsewhere"]
    assert not any((tmp_path / "elsewhere").iterdir()), "something was written outside"


def test_config_paths_inside_or_urls_are_accepted(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = load_config(str(_write_config(tmp_path, store__path="s3://bucket/gram.zarr")))
    assert cfg.data["x_train"] == str((tmp_path / "data" / "x.npy").resolve())
    assert cfg.store == "s3://bucket/gram.zarr"
    assert resolve_path(str(tmp_path), "a/./b/../c", "k") == str((tmp_path / "a" / "c").resolve())


# -- replacing a store takes --overwrite --------------------------------------------------------
def _chunks(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()
    }


def test_overwriting_a_store_needs_the_flag(ray_local, tmp_path, capsys):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", rng.normal(size=(100, 4)))
    np.save(tmp_path / "x2.npy", rng.normal(size=(100, 4)))
    store = tmp_path / "g.zarr"
    gram = ["gram", "--x", str(tmp_path / "x.npy"), "--store", str(store), "--tile", "64"]
    gram += ["--no-progress", "--workers", "2"] + KERNEL
    assert main(gram + ["--depth", "2"]) == 0
    before = _chunks(store)
    capsys.readouterr()
    for other in (["--depth", "3"], ["--depth", "2", "--kind", "nngp"]):
        assert main(gram + other) == 2
        err = capsys.readouterr().err
        assert "--overwrite" in err and str(store) in err, err
        assert _chunks(store) == before, "a refused run changed the store"
    other_x = [a if a != str(tmp_path / "x.npy") else str(tmp_path / "x2.npy") for a in gram]
    assert main(other_x + ["--depth", "2"]) == 2 and "--overwrite" in capsys.readouterr().err

    assert main(gram + ["--depth", "3", "--overwrite"]) == 0
    deep = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
    assert GramStore.open(str(store)).meta.kernel_fingerprint == deep.fingerprint()
    assert GramStore.open(str(store)).verify().ok


def test_a_directory_that_is_not_a_store_is_never_replaced_silently(tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(StoreMismatchError, match="--overwrite"):
        GramStore.create(str(target), SPEC, x, dtype="float64", tile=16, diag=np.ones(20))
    assert (target / "notes.txt").read_text() == "mine"
    GramStore.create(
        str(target), SPEC, x, dtype="float64", tile=16, overwrite=True, diag=np.ones(20)
    )
    assert not (target / "notes.txt").exists()


# -- no credentials in the repository -----------------------------------------------------------
CREDENTIAL_PATTERNS = {
    "AWS access key id": rb"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": rb"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{30,}",
    "private key": rb"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GCP service-account key": rb"\"private_key\"\s*:\s*\"-----BEGIN",
    "Ray token value": rb"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?(?!\$)[A-Fa-f0-9]{32,}",
}
CREDENTIAL_FILES = re.compile(r"(^|/)(credentials|\.env|auth_token|.*\.pem|.*\.p12|.*-key\.json)$")


def _repo_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out.splitlines() if (REPO / f).is_file()]


@pytest.mark.cluster  # starts a subprocess or Ray itself
def test_no_credentials_in_the_repository():
    files = _repo_files()
    assert "deploy/aws-gpu.yaml" in files
    named = [f for f in files if CREDENTIAL_FILES.search(f)]
    assert not named, f"credential-like files in the repository: {named}"
    for name in files:
        data = (REPO / name).read_bytes()
        for what, pattern in CREDENTIAL_PATTERNS.items():
            assert not re.search(pattern, data), f"{name} holds what looks like a {what}"
