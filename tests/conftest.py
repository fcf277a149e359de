"""Shared fixtures: where the real assets are, a loopback HTTP server, tiny random checkpoints.

Everything here runs offline. Tests that need the real files beside the repo (datasets, tokenizers,
stories260K) take the `assets` fixture, which skips with the reason when they are absent.
"""
from __future__ import annotations

import http.server
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # flat scripts: `import t5, llama, data, ...`


def assets_dir() -> Path | None:
    """TINYLLM_ASSETS, else ../shared/assets beside the repo when it exists."""
    env = os.environ.get("TINYLLM_ASSETS")
    path = Path(env) if env else REPO.parent / "shared" / "assets"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def assets() -> Path:
    path = assets_dir()
    if path is None:
        pytest.skip("real assets not found: set TINYLLM_ASSETS to the shared/assets folder "
                    "(datasets, tokenizers, stories260K) to run this test")
    return path


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one intra-op thread beats OpenMP's fan-out, above all on a busy
    2-core CI machine (measured: test_t5.py went from ~140 s to ~23 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves `server.root`; `server.hooks[path]` (a callable taking the handler) may answer instead,
    so a test can inject 404s, 500s, truncated bodies or hangs for one path."""

    def translate_path(self, path: str) -> str:
        rel = path.split("?", 1)[0].lstrip("/")
        return str(Path(self.server.root) / rel)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        hook = self.server.hooks.get(self.path.split("?", 1)[0])
        if hook is not None:
            return hook(self)
        return super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        self.server.requests.append(self.path)
        hook = self.server.hooks.get(self.path.split("?", 1)[0])
        if hook is None:
            self.send_error(404)
            return
        return hook(self)

    def log_message(self, *args) -> None:
        pass


def download(dataset: str, data_dir: str | Path, base_url: str | None = None, rationales: bool = False) -> Path:
    """A dataset's three split files (and with rationales=True the release's teacher rationales) fetched into
    data_dir/<dataset>/ up front, as data.load_split and the release teacher fetch them when first read."""
    import data
    files = [data.split_file(dataset, split) for split in data.SPLITS]
    if rationales:
        files += [rel for split in data.SPLITS for rel in data.rationale_files(dataset, split)]
    for rel in files:
        data.fetch(rel, data_dir, base_url)
    return Path(data_dir) / dataset


def start_server(root: str | Path) -> http.server.ThreadingHTTPServer:
    """A loopback HTTP server over a folder: `server.url` is `http://127.0.0.1:PORT`, `server.hooks`
    maps a path to a handler function, `server.requests` records the paths asked for. stop_server()
    ends it (the serve_folder fixture does that for you)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.root = str(root)
    server.hooks = {}
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_server(server: http.server.ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def serve_folder():
    """`server = serve_folder(root)`: start_server's server, stopped when the test ends."""
    servers = []

    def start(root: str | Path) -> http.server.ThreadingHTTPServer:
        servers.append(start_server(root))
        return servers[-1]

    yield start
    for server in servers:
        stop_server(server)


def make_tiny_t5(folder: Path, spiece: Path, **overrides) -> Path:
    """A random FLAN-T5-shaped (v1.1, gated-gelu, untied) checkpoint with the real T5 vocabulary,
    saved by transformers, plus spiece.model: what a hub folder looks like."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                  num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    config.update(overrides)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(spiece, folder / "spiece.model")
    return folder


def make_tiny_llama(folder: Path, tokenizer_model: Path, vocab_size: int, **overrides) -> Path:
    """A random LLaMA-shaped checkpoint (GQA) with a real sentencepiece tokenizer.model."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder


def edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint folder `src` at `dst` whose model.safetensors state dict went through
    `edit` (drop a key, add one, change a shape): for the strict-loading error tests."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory, assets) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), assets / "t5_tokenizer" / "spiece.model")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, assets) -> Path:
    """Random weights over the stories260K 512-token vocabulary (small and real)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"),
                           assets / "stories260K" / "tok512.model", vocab_size=512)


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA with a chat template: a chat model (teacher or instruction-tuned student)."""
    folder = tmp_path_factory.mktemp("tiny_chat_llama")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder
