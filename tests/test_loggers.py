"""W&B never stops a run: no key, no network or a refused key → offline, with one warning; the key is never written."""

from __future__ import annotations

import base64
import http.server
import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import wandb
from wandb.errors import AuthenticationError

from lightning_mtl.loggers import WandbLogger, wandb_offline_reason


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc


def test_no_api_key_means_offline(no_wandb_env):
    assert wandb_offline_reason() == "no W&B API key (set WANDB_API_KEY or run `wandb login`)"


def test_unreachable_host_means_offline(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # nothing listens on the discard port
    reason = wandb_offline_reason(timeout=0.5)
    assert reason is not None and reason.startswith("127.0.0.1:9 is unreachable")


def test_explicit_mode_is_respected(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_offline_reason() == "WANDB_MODE=disabled"


def test_logger_goes_offline_with_one_warning(no_wandb_env, tmp_path):
    with pytest.warns(UserWarning, match="W&B logging offline: no W&B API key"):
        logger = WandbLogger(save_dir=str(tmp_path / "runs"))
    assert logger._offline
    forced = WandbLogger(save_dir=str(tmp_path / "runs"), offline=True)
    assert forced._offline


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs: a failing W&B never stops training, warns once, and never writes the API key anywhere.

REPO = Path(__file__).resolve().parents[1]


def _sentinel_key() -> str:
    """A fresh 40-character key in W&B's format (letters, digits, underscores), unlikely anywhere by chance."""
    return "LEAK" + secrets.token_hex(18)


def _closed_port() -> int:
    with socket.socket() as s:  # bound then released: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RejectingWandbApi(http.server.BaseHTTPRequestHandler):
    """W&B's API refusing the key: every GraphQL request gets HTTP 401, anything else 404."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(401 if self.path.startswith("/graphql") else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "invalid api key"}]}')

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def rejecting_wandb_server():
    """Base URL of a local W&B API that rejects every API key (a reachable host, so the logger first tries online)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RejectingWandbApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# A short fit in a fresh process: wandb reads its environment once per process and keeps a run open between
# Lightning loggers, so a whole run is only faithful (and isolated from other tests) in its own interpreter.
_FIT_SCRIPT = '''
import json, sys, warnings
import lightning as L, torch
from lightning_mtl.loggers import WandbLogger

class Tiny(L.LightningModule):
    def __init__(self, hidden: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(hidden, 1)
    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)

save_dir, steps = sys.argv[1], int(sys.argv[2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    logger = WandbLogger(save_dir=save_dir)
    trainer = L.Trainer(max_steps=steps, logger=logger, log_every_n_steps=1, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny())
texts = [str(w.message) for w in caught]
print("RESULT " + json.dumps({"step": trainer.global_step, "offline": logger._offline,
                              "wandb_warnings": [t for t in texts if "W&B" in t or "wandb" in t.lower()]}))
'''


def _fresh_env(tmp_path: Path, **wandb_vars: str) -> dict[str, str]:
    """The environment minus any W&B / XDG setting, HOME and TMPDIR inside ``tmp_path``, plus ``wandb_vars``; wandb's
    console messages stay on (conftest silences them) so that its own warnings would be seen."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))}
    return {**env, "HOME": str(home), "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1", **wandb_vars}


def _fit_in_fresh_process(tmp_path: Path, env: dict[str, str], steps: int) -> tuple[dict, str]:
    """Fit a tiny model ``steps`` steps with our WandbLogger; its result (step, offline, W&B warnings) and stderr."""
    proc = subprocess.run([sys.executable, "-c", _FIT_SCRIPT, str(tmp_path / "runs"), str(steps)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), proc.stdout + proc.stderr


def _assert_logged_offline_locally(save_dir: Path, steps: int) -> None:
    runs = list((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    history = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
    assert history.count(b"train/loss") >= steps  # one history row per logged step


def _wandb_console_complaints(output: str) -> list[str]:
    return [line for line in output.splitlines() if "wandb: WARNING" in line or "wandb: ERROR" in line]


def test_no_network_whole_fit_goes_offline_with_one_warning(tmp_path):
    """(a) A key but an unreachable host (a closed local port): offline from the start, one warning, training done."""
    key = _sentinel_key()
    env = _fresh_env(tmp_path, WANDB_API_KEY=key, WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}")
    result, output = _fit_in_fresh_process(tmp_path, env, steps=6)
    assert result["step"] == 6 and result["offline"]
    (warning,) = result["wandb_warnings"]
    assert warning.startswith("W&B logging offline: 127.0.0.1:") and "is unreachable" in warning
    assert _wandb_console_complaints(output) == [] and key not in output
    _assert_logged_offline_locally(tmp_path / "runs", steps=6)


def test_reachability_uses_the_port_of_the_base_url(no_wandb_env, monkeypatch):
    """A self-hosted server on a non-443 port is reachable when something listens there (it was probed on 443)."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert wandb_offline_reason(timeout=2.0) is None


def test_rejected_key_whole_fit_continues_offline_with_one_warning(rejecting_wandb_server, tmp_path):
    """(b) A reachable host that refuses the key: the real ``wandb.init`` raises CommError, the run restarts offline
    (with wandb's environment already read, so by argument) and logs locally; one warning, no wandb complaint."""
    key = _sentinel_key()
    env = _fresh_env(tmp_path, WANDB_API_KEY=key, WANDB_BASE_URL=rejecting_wandb_server)
    result, output = _fit_in_fresh_process(tmp_path, env, steps=6)
    assert result["step"] == 6 and result["offline"]
    (warning,) = result["wandb_warnings"]
    assert warning.startswith("W&B could not start online (CommError") and warning.endswith("logging offline instead.")
    assert _wandb_console_complaints(output) == [] and key not in output
    _assert_logged_offline_locally(tmp_path / "runs", steps=6)


def test_authentication_error_is_redacted_and_logger_restarts_offline(no_wandb_env, monkeypatch, tmp_path):
    """(b') ``wandb.init`` raising AuthenticationError whose message quotes the key: one warning showing ``***``, and
    the restart asks wandb for offline mode explicitly."""
    key = _sentinel_key()
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setattr("lightning_mtl.loggers.wandb_offline_reason", lambda timeout=2.0: None)  # "reachable"
    monkeypatch.setattr(wandb, "run", None)
    calls = []

    def init(**kwargs):
        calls.append(kwargs.get("mode"))
        if kwargs.get("mode") != "offline":
            raise AuthenticationError(f"API key {key} is invalid")
        return "offline run"

    monkeypatch.setattr(wandb, "init", init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = WandbLogger(save_dir=str(tmp_path / "runs"))
        assert logger.experiment == "offline run" and logger.experiment == "offline run"
    assert [str(w.message) for w in caught] == [
        "W&B could not start online (AuthenticationError: API key *** is invalid); logging offline instead."]
    assert calls == [None, "offline"] and logger._offline and "anonymous" not in logger._wandb_init


def _secret_forms(key: str) -> list[bytes]:
    """The key as text and as it travels in the HTTP Basic header (``api:<key>`` in base64)."""
    return [key.encode(), base64.b64encode(key.encode()), base64.b64encode(f"api:{key}".encode())]


def _strings_in(obj, depth: int = 0):
    """Every string reachable in an unpickled checkpoint, tensors skipped."""
    if depth > 20 or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, (str, bytes)):
        yield obj if isinstance(obj, str) else obj.decode("latin-1")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings_in(k, depth + 1)
            yield from _strings_in(v, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _strings_in(v, depth + 1)
    elif hasattr(obj, "__dict__"):
        yield from _strings_in(vars(obj), depth + 1)
    else:
        yield repr(obj)


def test_recipe_fit_never_writes_the_api_key(omniglot_root, cache_dir, rejecting_wandb_server, tmp_path):
    """(c) A real few-shot recipe fit (real Omniglot) with a sentinel WANDB_API_KEY that W&B rejects: the key is in no
    file the run, wandb or its service wrote (HOME and TMPDIR included), nor in the checkpoints once unpickled, nor in
    stdout/stderr."""
    key = _sentinel_key()
    env = _fresh_env(tmp_path, WANDB_API_KEY=key, WANDB_BASE_URL=rejecting_wandb_server,
                     LIGHTNING_MTL_DATA=str(omniglot_root), LIGHTNING_MTL_CACHE=str(cache_dir))
    run = tmp_path / "run"
    args = ["fit", "--config", str(REPO / "recipes" / "configs" / "omniglot" / "protonet_5w1s_quick.yaml"),
            "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=2",
            "--trainer.max_time=null", "--trainer.enable_progress_bar=false", "--trainer.precision=32",
            "--data.episodes.train_ways=5", "--data.episodes.val_episodes=8", "--data.episodes.eval_meta_batch_size=8",
            f"--trainer.logger.init_args.save_dir={run}/wandb_logs", f"--checkpoint.dirpath={run}/checkpoints"]
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "fewshot.py"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "W&B could not start online (CommError" in proc.stderr  # the key was really offered to W&B, and refused

    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    suffixes = {f.suffix for f in files}
    # the scan covers what the brief names: our config, both checkpoints, wandb's run, logs and service log
    assert {"config.yaml", "last.ckpt", "output.log", "debug.log", "debug-internal.log"} <= names, sorted(names)
    assert {".wandb", ".ckpt"} <= suffixes and any(n.startswith("core-debug") for n in names), sorted(names)
    assert list(run.glob("wandb_logs/wandb/offline-run-*"))
    forms = _secret_forms(key)
    leaks = [str(f.relative_to(tmp_path)) for f in files if any(s in f.read_bytes() for s in forms)]
    assert leaks == []
    for ckpt in run.glob("checkpoints/*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert "hyper_parameters" in state and "datamodule_hyper_parameters" in state
        assert not [s for s in _strings_in(state) if key in s], ckpt
    for stream in (proc.stdout, proc.stderr):
        assert not any(s.decode() in stream for s in forms)


@pytest.mark.parametrize("where", ["cli", "yaml"])
def test_api_key_as_a_config_value_is_refused(where, no_wandb_env, tmp_path, monkeypatch):
    """Our logger takes no key argument: a key given on the command line or in a YAML stops the parse with an error,
    before anything is written."""
    spec = importlib.util.spec_from_file_location("fewshot_recipe_for_loggers", REPO / "recipes" / "fewshot.py")
    fewshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fewshot)
    monkeypatch.setattr(sys, "argv", ["fewshot.py"])
    key = _sentinel_key()
    run = tmp_path / "run"
    args = ["fit", "--config", str(REPO / "recipes" / "configs" / "omniglot" / "protonet_5w1s_quick.yaml"),
            f"--trainer.logger.init_args.save_dir={run}", f"--checkpoint.dirpath={run}/checkpoints"]
    if where == "cli":
        args.append(f"--trainer.logger.init_args.api_key={key}")
    else:
        extra = tmp_path / "key.yaml"
        extra.write_text(f"trainer:\n  logger:\n    init_args:\n      api_key: {key}\n")
        args += ["--config", str(extra)]
    with pytest.raises(SystemExit) as exit_info:
        fewshot.main(args)
    assert exit_info.value.code != 0
    assert not run.exists() or not any(run.rglob("*"))
