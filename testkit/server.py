"""A real headless ComfyUI server with the pack loaded from this checkout (test tier 3).

The server gets its own base directory (models, input, output, user, custom_nodes), so tests
write tiny model files of the real formats into ``models_dir`` and read results from
``output_dir``; nothing touches the ComfyUI installation itself.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from testkit.comfyui import ComfyInstall, prepare_pack_link

STARTUP_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptFailed(AssertionError):
    pass


class ComfyServer:
    def __init__(self, install: ComfyInstall, base_dir: Path):
        self.install = install
        self.base_dir = base_dir
        self.models_dir = base_dir / "models"
        self.input_dir = base_dir / "input"
        self.output_dir = base_dir / "output"
        for d in (self.models_dir, self.input_dir, self.output_dir):
            d.mkdir(parents=True, exist_ok=True)
        prepare_pack_link(base_dir)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base_dir / "server.log"
        self.client_id = str(uuid.uuid4())
        self._proc: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        cmd = [sys.executable, str(self.install.root / "main.py"), "--cpu",
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir),
               "--disable-auto-launch"]
        env = dict(os.environ)
        overlay = self.install.root / "overlay"
        if overlay.is_dir():  # v0.3.64's pinned frontend packages (see scripts/setup_comfyui.sh)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(overlay), env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen(cmd, cwd=str(self.install.root), env=env,
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during startup:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}")
        if "IMPORT FAILED" in self.log_path.read_text():
            raise RuntimeError(f"ComfyUI could not import a custom node pack:\n{self.log_tail()}")
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def log_tail(self, n_chars: int = 6000) -> str:
        try:
            return self.log_path.read_text()[-n_chars:]
        except OSError:
            return "<no log>"

    # -- HTTP ------------------------------------------------------------------------------------
    def request(self, path: str, data: dict | None = None, timeout: float = 30):
        """Returns (status, parsed JSON or text)."""
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get_json(self, path: str, timeout: float = 30):
        status, payload = self.request(path, timeout=timeout)
        if status != 200:
            raise AssertionError(f"GET {path} -> HTTP {status}: {payload}")
        return payload

    def object_info(self, node_class: str | None = None) -> dict:
        info = self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))
        return info[node_class] if node_class else info

    def post_prompt(self, prompt: dict):
        """POST /prompt; returns (status, payload) without raising, for tests of bad prompts."""
        return self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for it; returns its /history entry or raises PromptFailed."""
        status, payload = self.post_prompt(prompt)
        if status != 200:
            raise PromptFailed(f"/prompt rejected the workflow (HTTP {status}): "
                               f"{json.dumps(payload, indent=1)[:4000]}")
        prompt_id = payload["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                if entry["status"].get("status_str") != "success":
                    raise PromptFailed("prompt failed: " + json.dumps(entry["status"].get("messages"), indent=1)[-6000:]
                                       + "\n--- server log ---\n" + self.log_tail(3000))
                return entry
            if self._proc is None or self._proc.poll() is not None:
                raise PromptFailed("server died while running the prompt:\n" + self.log_tail())
            time.sleep(0.25)
        self.request("/interrupt", {})
        raise PromptFailed(f"prompt did not finish within {timeout}s\n{self.log_tail(3000)}")

    def output_files(self, history_entry: dict) -> list[Path]:
        """Every file an output node of this prompt wrote (images, videos, latents...)."""
        files = []
        for node_output in history_entry.get("outputs", {}).values():
            for items in node_output.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item:
                        root = {"output": self.output_dir, "input": self.input_dir,
                                "temp": self.base_dir / "temp"}.get(item.get("type", "output"), self.output_dir)
                        files.append(root / item.get("subfolder", "") / item["filename"])
        return files
