"""The MLflow pyfunc of an exported model: the file MLflow runs to load it (models from code, no pickle).

pipelines/registry.py logs this file with the export's `hf/` directory as the artifact `hf` (one copy of the
weights, which `transformers` loads as well). Loading reads the weights with tipsv2.models.load_hf
(safetensors) and the SentencePiece tokenizer beside them.

    model = mlflow.pyfunc.load_model("models:/tipsv2-pretrain/1")
    out = model.predict(pd.DataFrame({"image": [png_bytes, None], "text": [None, "a red cube"]}))

Input: one row per item, `image` (encoded image bytes: PNG, JPEG, ...) or `text` (a string), or both.
Output: a DataFrame with one row per input row: `cls1`, `cls2` (lists of floats, the image's two CLS
embeddings, as `TIPSModel.encode_image`) and `text` (the text embedding, as `encode_text`); None where the
row has no image or no text. Embeddings are not L2-normalised (as ours). Images are fed as
tipsv2.eval.features does: short side to the model's `image_size` (bicubic), centre crop, RGB in [0, 1].
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from PIL import Image

from tipsv2.eval.features import resize_center_crop, to_tensor
from tipsv2.models.hf import load_hf
from tipsv2.tokenizer import Tokenizer

HF_ARTIFACT = "hf"
TOKENIZER_FILE = "tokenizer.model"


def present(value) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)   # NaN: pandas' missing


class TipsPyfunc(PythonModel):
    def load_context(self, context) -> None:
        directory = Path(context.artifacts[HF_ARTIFACT])
        self.model = load_hf(directory).eval()
        self.tokenizer = Tokenizer(directory / TOKENIZER_FILE, max_len=self.model.cfg.text.max_len)

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        unknown = set(frame.columns) - {"image", "text"}
        if unknown or frame.empty:
            raise ValueError(f"expected a non-empty DataFrame with columns image (bytes) and/or text (str); got "
                             f"columns {sorted(frame.columns)} and {len(frame)} rows")
        images = frame["image"].tolist() if "image" in frame else [None] * len(frame)
        texts = frame["text"].tolist() if "text" in frame else [None] * len(frame)
        out = pd.DataFrame({"cls1": [None] * len(frame), "cls2": [None] * len(frame), "text": [None] * len(frame)},
                           dtype=object)
        rows = [i for i, image in enumerate(images) if present(image)]
        if rows:
            size = self.model.cfg.vision.image_size
            batch = torch.stack([to_tensor(resize_center_crop(Image.open(io.BytesIO(bytes(images[i]))), size))
                                 for i in rows])
            features = self.model.encode_image(batch, stochastic_depth=False)
            for i, cls1, cls2 in zip(rows, features.cls1.tolist(), features.cls2.tolist()):
                out.at[i, "cls1"], out.at[i, "cls2"] = cls1, cls2
        rows = [i for i, text in enumerate(texts) if present(text)]
        if rows:
            embedded = self.model.encode_text(*self.tokenizer([str(texts[i]) for i in rows]))
            for i, vector in zip(rows, embedded.tolist()):
                out.at[i, "text"] = vector
        return out


mlflow.models.set_model(TipsPyfunc())
