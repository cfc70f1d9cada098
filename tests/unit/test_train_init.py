"""`dsv3 train --init-from`: fine-tuning starts from another model's weights, config and tokenizer."""

from __future__ import annotations

import shutil

import pytest

from dsv3 import hf
from dsv3.errors import ConfigError
from dsv3.model.transformer import Transformer
from dsv3.train.trainer import Trainer
from fixtures import micro_config, write_corpus


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained micro run (its checkpoints and hf/ export) and its corpus."""
    root = tmp_path_factory.mktemp("init")
    data, cache = write_corpus(root / "corpus", n_docs=20), root / "cache"
    Trainer(micro_config(root / "src", data, cache, steps=3, save_every=3)).fit()
    return root / "src" / "run", data, cache


def first_step_matches_the_source(trainer: Trainer, reference: Transformer) -> None:
    state = trainer.loader.state_dict()
    b = trainer.loader.next_batch()
    x, y = b.input_ids, b.labels
    trainer.loader.load_state_dict(state)
    want = reference(x, labels=y).loss.item()  # with autograd on, as in training (the same fused CE path)
    assert trainer.train_step()["loss"] == want


@pytest.mark.parametrize("layout", ["run folder", "hf export", "fp8 release"])
def test_loss_at_step_0_is_the_source_models(source, tmp_path, layout):
    run, data, cache = source
    folder = {"run folder": run, "hf export": run / "hf"}.get(layout)
    if folder is None:  # DeepSeek's FP8 release format: E4M3 weights with 128x128 scales
        folder = tmp_path / "fp8"
        hf.save_pretrained(Transformer.from_pretrained(run / "hf"), folder, fp8=True)
        shutil.copyfile(run / "hf" / "tokenizer.json", folder / "tokenizer.json")
    cfg = micro_config(tmp_path, data, cache, steps=2, init_from=str(folder), model_overrides={})
    trainer = Trainer(cfg)
    assert trainer.optimizer.state == {}  # a fresh optimizer
    assert trainer.tokenizer_path == hf.resolve_model_folder(folder) / "tokenizer.json"
    first_step_matches_the_source(trainer, Transformer.from_pretrained(folder).train())


def test_overrides_may_not_change_shapes(source, tmp_path):
    run, data, cache = source
    with pytest.raises(ConfigError, match="num_hidden_layers.*change .* tensors"):
        Trainer(
            micro_config(tmp_path, data, cache, init_from=str(run), model_overrides={"num_hidden_layers": 3})
        )
    trainer = Trainer(
        micro_config(tmp_path, data, cache, init_from=str(run), model_overrides={"aux_loss_alpha": 0.0})
    )
    assert trainer.model_config.aux_loss_alpha == 0.0
