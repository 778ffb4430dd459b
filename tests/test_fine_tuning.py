"""Fine-tuning, Helical style, on the small fixture models."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from caduceus import CaduceusConfig, CaduceusFineTuningModel, CaduceusForMaskedLM, reverse_complement
from caduceus.dna_dataset import DNADataset
from caduceus.fine_tuning import ClassificationHead, FineTuningHead, RegressionHead, make_scheduler
from caduceus.metrics import classification_metrics, regression_metrics
from tests.conftest import FIXTURES

PH, PS = FIXTURES / "ph_d32_n2", FIXTURES / "ps_d32_n2"
SEQUENCES = ["ACT" * 8, "ATG" * 8, "ATG" * 6, "CTG" * 8, "TTG" * 7, "GGCA" * 5]
LABELS = [0, 2, 2, 0, 1, 1]


def make(model=PH, head="classification", output_size=3, batch_size=6, **kwargs):
    config = CaduceusConfig(model_name=model, batch_size=batch_size, **kwargs)
    return CaduceusFineTuningModel(config, head, output_size)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ----- heads -----


def test_head_choice_and_the_reference_errors():
    assert type(make(head="regression", output_size=2).fine_tuning_head) is RegressionHead
    with pytest.raises(ValueError, match="The output_size must be specified for a classification head."):
        make(output_size=None)
    with pytest.raises(ValueError, match="The output_size must be specified for a regression head."):
        make(head="regression", output_size=None)
    with pytest.raises(NotImplementedError, match="Not implemented fine-tuning head."):
        make(head="ranking")
    with pytest.raises(ValueError, match="fine_tuning_head must be"):
        make(head=nn.Linear(32, 3))


class TwoLayerHead(FineTuningHead):
    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.output_size = output_size

    def set_dim_size(self, dim: int) -> None:
        self.layers = nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, self.output_size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)


def test_custom_head_trains():
    model = make(head=TwoLayerHead(3))
    dataset = model.process_data(SEQUENCES)
    before = params(model.fine_tuning_head)
    history = model.train(dataset, LABELS, epochs=2)
    assert len(history["train_loss"]) == 2
    assert any(not torch.equal(before[k], p) for k, p in params(model.fine_tuning_head).items())
    assert model.get_outputs(dataset).shape == (6, 3)


# ----- outputs, modes, forward -----


@pytest.mark.parametrize("backbone", [PH, PS])
def test_get_outputs_before_train(backbone):
    model = make(backbone)
    outputs = model.get_outputs(model.process_data(SEQUENCES))
    assert outputs.shape == (6, 3) and outputs.dtype == np.float32
    assert not model.training and not model.fine_tuning_head.training


def test_eval_and_train_modes_and_forward():
    model = make()
    assert model.eval() is model and not model.training and not model.model.training
    assert model.train() is model and model.training and model.fine_tuning_head.training
    dataset = model.process_data(SEQUENCES)
    model.eval()
    with torch.no_grad():
        logits = model(dataset.input_ids, dataset.attention_mask)
    np.testing.assert_allclose(logits.numpy(), model.get_outputs(dataset), atol=1e-5)


@pytest.mark.parametrize("backbone, conjoin", [(PH, True), (PS, False)])
def test_conjoined_outputs_are_reverse_complement_invariant(backbone, conjoin):
    model = make(backbone)
    forward = model.get_outputs(model.process_data(SEQUENCES), conjoin=conjoin)
    reverse = model.get_outputs(model.process_data([reverse_complement(s) for s in SEQUENCES]), conjoin=conjoin)
    np.testing.assert_allclose(forward, reverse, atol=1e-5)


# ----- training -----


def test_train_learns_and_reports_validation_metrics():
    model = make()
    dataset = model.process_data(SEQUENCES)
    history = model.train(dataset, LABELS, optimizer_params={"lr": 3e-3}, epochs=4, trainable_layers=0,
                          validation_dataset=dataset, validation_labels=np.array(LABELS))
    assert set(history) == {"epoch", "train_loss", "val_loss", "val_accuracy", "val_mcc", "val_auroc"}
    assert history["epoch"] == [1, 2, 3, 4]
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert model.training  # left in train mode, as the reference leaves it
    outputs = model.get_outputs(dataset)
    expected = classification_metrics(np.array(LABELS), outputs)
    assert history["val_accuracy"][-1] == expected["accuracy"]
    loss = nn.functional.cross_entropy(torch.from_numpy(outputs), torch.tensor(LABELS)).item()
    assert history["val_loss"][-1] == pytest.approx(loss, rel=1e-5)


def test_trainable_layers_freezes_as_the_reference_does():
    model = make()
    before = params(model)
    model.train(model.process_data(SEQUENCES), LABELS, optimizer_params={"lr": 1e-2}, trainable_layers=1)
    after = params(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(n.startswith(("model.backbone.layers.1.", "fine_tuning_head.")) for n in changed)
    assert any(n.startswith("fine_tuning_head.") for n in changed)
    assert any(n.startswith("model.backbone.layers.1.") for n in changed)
    assert not model.model.backbone.embeddings.word_embeddings.weight.requires_grad
    assert not model.model.backbone.norm_f.weight.requires_grad


def test_seeded_shuffling_and_rc_augmentation_are_reproducible():
    def run(seed):
        torch.manual_seed(0)  # same head init and dropout draws
        model = make(batch_size=2)
        model.train(model.process_data(SEQUENCES), LABELS, optimizer_params={"lr": 1e-2}, seed=seed,
                    rc_augment=True, max_grad_norm=0.5)
        return model.get_outputs(model.process_data(SEQUENCES))

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_multi_output_regression():
    model = make(head="regression", output_size=2)
    dataset = model.process_data(SEQUENCES)
    targets = np.random.default_rng(0).normal(size=(6, 2))
    history = model.train(dataset, targets, loss_function=nn.MSELoss(), validation_dataset=dataset,
                          validation_labels=targets, epochs=2, mixed_precision=True)
    assert set(history) == {"epoch", "train_loss", "val_loss", "val_mse", "val_pearson"}
    assert np.isfinite(history["train_loss"]).all()
    outputs = model.get_outputs(dataset)
    assert outputs.shape == (6, 2)
    assert history["val_mse"][-1] == pytest.approx(regression_metrics(targets, outputs)["mse"], rel=1e-3)


def test_single_output_regression_takes_a_flat_label_vector():
    model = make(head="regression", output_size=1)
    history = model.train(model.process_data(SEQUENCES), np.linspace(0, 1, 6), loss_function=nn.MSELoss())
    assert np.isfinite(history["train_loss"]).all()


class NoiseOptimizer(torch.optim.Optimizer):
    """Moves each trainable parameter by seeded noise: validation losses that go up and down."""

    def __init__(self, params, scale=0.5):
        super().__init__(params, {"scale": scale})
        self.generator = torch.Generator().manual_seed(3)

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data += group["scale"] * torch.randn(p.shape, generator=self.generator)


def test_early_stopping_stops_and_restores_the_best_weights():
    model = make()
    dataset = model.process_data(SEQUENCES)
    history = model.train(dataset, LABELS, optimizer=NoiseOptimizer, optimizer_params={}, epochs=12,
                          validation_dataset=dataset, validation_labels=LABELS, early_stopping_patience=2)
    losses = history["val_loss"]
    best = int(np.argmin(losses))
    assert len(losses) == best + 3 < 12  # stopped two epochs after the best one
    final = nn.functional.cross_entropy(torch.from_numpy(model.get_outputs(dataset)), torch.tensor(LABELS)).item()
    assert final == pytest.approx(losses[best], rel=1e-5) and final < losses[-1]


def test_lr_scheduler_schedules():
    def factors(name, steps=10, warmup=2):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_scheduler(optimizer, steps, name=name, num_warmup_steps=warmup)
        values = []
        for _ in range(steps):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    assert factors("linear")[:4] == pytest.approx([0.0, 0.5, 1.0, 0.875])
    assert factors("cosine")[2] == 1.0 and factors("cosine")[-1] < 0.05
    assert factors("constant", warmup=0) == [1.0] * 10
    with pytest.raises(ValueError, match="unknown lr scheduler 'cyclic'"):
        make_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 10, name="cyclic")
    model = make()
    history = model.train(model.process_data(SEQUENCES), LABELS, epochs=2,
                          lr_scheduler_params={"name": "linear", "num_warmup_steps": 1})
    assert len(history["train_loss"]) == 2


# ----- bad input, caught before any work -----


@pytest.mark.parametrize("labels, error, message", [
    ([0, 1, 2], ValueError, "3 labels for 6 sequences"),
    (["a", "b", "c", "a", "b", "c"], TypeError, "must be numbers"),
    ([0.0, 1.0, 2.0, 0.0, 1.0, 1.0], TypeError, "integer class id"),
    ([0, 1, 3, 0, 1, 1], ValueError, "class id 3 at index 2 is outside 0..2"),
    ([0, 1, -1, 0, 1, 1], ValueError, "class id -1 at index 2"),
])
def test_bad_classification_labels(labels, error, message):
    model = make()
    before = params(model)
    with pytest.raises(error, match=message):
        model.train(model.process_data(SEQUENCES), labels)
    assert all(torch.equal(before[k], p) for k, p in params(model).items())


def test_bad_regression_labels_and_validation_data():
    model = make(head="regression", output_size=2)
    dataset = model.process_data(SEQUENCES)
    good = np.zeros((6, 2))
    with pytest.raises(ValueError, match="3 values per sequence for a head with output_size=2"):
        model.train(dataset, np.zeros((6, 3)), loss_function=nn.MSELoss())
    with pytest.raises(ValueError, match="a regression head needs a regression loss"):
        model.train(dataset, good)
    nan = good.copy()
    nan[4, 1] = np.nan
    before = params(model)
    with pytest.raises(ValueError, match="validation_labels: NaN at index 4"):
        model.train(dataset, good, loss_function=nn.MSELoss(), validation_dataset=dataset, validation_labels=nan)
    with pytest.raises(ValueError, match="validation needs both"):
        model.train(dataset, good, loss_function=nn.MSELoss(), validation_dataset=dataset)
    with pytest.raises(ValueError, match="early stopping needs validation data"):
        model.train(dataset, good, loss_function=nn.MSELoss(), early_stopping_patience=1)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        empty = torch.zeros(0, 4, dtype=torch.long)
        model.train(DNADataset(empty, empty), np.zeros((0, 2)), loss_function=nn.MSELoss())
    assert all(torch.equal(before[k], p) for k, p in params(model).items())


def test_windowed_data_is_refused_for_fine_tuning():
    model = make(max_length=10)
    windowed = model.process_data(SEQUENCES, windows=True)
    with pytest.raises(ValueError, match="windowed"):
        model.train(windowed, LABELS)
    with pytest.raises(ValueError, match="windows=False"):
        model.get_outputs(windowed)


# ----- checkpoints -----


@pytest.mark.parametrize("backbone, suffix", [(PH, ".pt"), (PS, ".safetensors")])
def test_save_and_load_model_keep_the_reference_layout(tmp_path, backbone, suffix):
    model = make(backbone, head="regression", output_size=10)
    keys = set(model.state_dict())
    assert {"fine_tuning_head.linear.weight", "fine_tuning_head.linear.bias", "model.backbone.norm_f.weight",
            "model.backbone.layers.0.norm.weight"} <= keys
    assert all(k.startswith(("model.backbone.", "fine_tuning_head.linear.")) for k in keys)
    mixer = "model.backbone.layers.1.mixer." + ("submodule." if backbone == PS else "")
    assert {mixer + "mamba_fwd.in_proj.weight", mixer + "mamba_rev.A_log"} <= keys
    embedding = "model.backbone.embeddings.word_embeddings." + ("embedding.weight" if backbone == PS else "weight")
    assert embedding in keys
    dataset = model.process_data(SEQUENCES)
    model.train(dataset, np.ones((6, 10)), loss_function=nn.MSELoss(), optimizer_params={"lr": 1e-2})
    path = tmp_path / f"model{suffix}"
    model.save_model(path)
    loaded = make(backbone, head="regression", output_size=10)
    loaded.load_model(path)
    assert not loaded.model.training and not loaded.fine_tuning_head.training
    assert loaded.fine_tuning_head.output_size == 10 and type(loaded.fine_tuning_head) is RegressionHead
    np.testing.assert_array_equal(loaded.get_outputs(dataset), model.get_outputs(dataset))


def test_load_model_backbone_only_and_bare_backbone(tmp_path):
    trained = make()
    trained.train(trained.process_data(SEQUENCES), LABELS, optimizer_params={"lr": 1e-2}, trainable_layers=0)
    backbone = {k: v for k, v in trained.state_dict().items() if k.startswith("model.")}
    torch.save(backbone, tmp_path / "backbone.pt")
    torch.save(trained.model.state_dict(), tmp_path / "bare.pt")
    with_prefix, bare = make(), make()
    with pytest.warns(UserWarning, match="only the backbone"):
        with_prefix.load_model(tmp_path / "backbone.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bare.load_model(tmp_path / "bare.pt")
    for model in (with_prefix, bare):
        assert all(torch.equal(a, b) for a, b in zip(model.model.state_dict().values(),
                                                     trained.model.state_dict().values()))


class Payload:
    ran = False

    def __reduce__(self):
        return (Payload._mark, ())

    @staticmethod
    def _mark():
        Payload.ran = True
        return {}


def test_load_model_never_unpickles(tmp_path):
    path = tmp_path / "pickled.pt"
    with open(path, "wb") as handle:
        pickle.dump(Payload(), handle, protocol=2)
    model = make()
    with pytest.raises(ValueError, match="never does"):
        model.load_model(path)
    assert not Payload.ran


@pytest.mark.parametrize("backbone", [PH, PS])
def test_save_pretrained_restores_head_type_and_size(tmp_path, backbone):
    model = make(backbone, head="regression", output_size=4, max_length=30, pooling_strategy="max")
    dataset = model.process_data(SEQUENCES)
    model.train(dataset, np.ones((6, 4)), loss_function=nn.MSELoss(), optimizer_params={"lr": 1e-2})
    model.save_pretrained(tmp_path / "tuned")
    loaded = CaduceusFineTuningModel.from_pretrained(tmp_path / "tuned")
    assert type(loaded.fine_tuning_head) is RegressionHead and loaded.fine_tuning_head.output_size == 4
    assert loaded.config["pooling_strategy"] == "max" and loaded.max_length == 30 and not loaded.training
    np.testing.assert_allclose(loaded.get_outputs(dataset), model.get_outputs(dataset), atol=1e-6)
    # the directory is also a plain model directory
    backbone_only = CaduceusForMaskedLM.from_pretrained(tmp_path / "tuned").caduceus
    assert all(torch.equal(a, b) for a, b in zip(backbone_only.state_dict().values(),
                                                 model.model.state_dict().values()))


def test_save_pretrained_with_a_custom_head_needs_the_head_back(tmp_path):
    model = make(head=TwoLayerHead(2))
    model.save_pretrained(tmp_path / "custom")
    with pytest.raises(ValueError, match="custom head .*TwoLayerHead"):
        CaduceusFineTuningModel.from_pretrained(tmp_path / "custom")
    loaded = CaduceusFineTuningModel.from_pretrained(tmp_path / "custom", fine_tuning_head=TwoLayerHead(2))
    dataset = model.process_data(SEQUENCES)
    np.testing.assert_allclose(loaded.get_outputs(dataset), model.get_outputs(dataset), atol=1e-6)


def test_classification_head_defaults():
    head = ClassificationHead(3)
    head.set_dim_size(5)
    assert head.dropout.p == 0.02 and head.linear.in_features == 5 and head.output_size == 3


# ----- metrics against scikit-learn -----


def test_metrics_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for classes in (2, 4):
        labels = rng.integers(0, classes, size=60)
        logits = rng.normal(size=(60, classes)) + np.eye(classes)[labels]
        logits[:5] = logits[5:10]  # ties in the scores
        labels[:5] = labels[5:10]
        ours = classification_metrics(labels, logits)
        probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        expected_auroc = sklearn_metrics.roc_auc_score(
            labels, probabilities[:, 1] if classes == 2 else probabilities, multi_class="ovr")
        assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, logits.argmax(1)))
        assert ours["mcc"] == pytest.approx(sklearn_metrics.matthews_corrcoef(labels, logits.argmax(1)))
        assert ours["auroc"] == pytest.approx(expected_auroc)
    targets, predictions = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    ours = regression_metrics(targets, predictions)
    assert ours["mse"] == pytest.approx(sklearn_metrics.mean_squared_error(targets, predictions))
    pearson = np.mean([np.corrcoef(targets[:, i], predictions[:, i])[0, 1] for i in range(3)])
    assert ours["pearson"] == pytest.approx(pearson)
