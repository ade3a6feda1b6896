"""Each SSL method, 2D and 3D: a finite loss that goes down on a fixed batch of real anatomy crops."""
import os

import nibabel
import numpy as np
import pytest
import torch

from medssl.augment.stream import ViewStream
from medssl.config import (ContrastiveConfig, DINOConfig, EncoderConfig, MaskedConfig, PretrainConfig, SSLConfig,
                           VICRegConfig, ViewsConfig)
from medssl.errors import ConfigError
from medssl.ssl import build_method, method_name

VIT = EncoderConfig(name="vit", patch_size=4, hidden_size=48, num_layers=2, num_heads=4, mlp_dim=96)
RESNET = EncoderConfig(name="resnet10")
MASKED = MaskedConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4, mask_ratio=0.5)
CONTRASTIVE = ContrastiveConfig(temperature=0.5, projection_dim=16)
# views on but mild: the test is about the optimisation, the seeds below fix the randomness per step
DINO = DINOConfig(out_dim=64, bottleneck_dim=16, hidden_dim=32, teacher_momentum=0.996)
VIEWS = ViewsConfig(rotate_degrees=5, noise_std=0.01, blur_sigma=(0.0, 0.5))

CASES = {
    "simclr-resnet": (RESNET, SSLConfig(contrastive=CONTRASTIVE)),
    "simclr-vit": (VIT, SSLConfig(contrastive=CONTRASTIVE)),
    "mae": (VIT, SSLConfig(masked=MASKED)),
    "mae+contrastive": (VIT, SSLConfig(masked=MASKED, contrastive=CONTRASTIVE)),
    "vicreg-resnet": (RESNET, SSLConfig(vicreg=VICRegConfig(expander_dim=32))),
    "dino-resnet": (RESNET, SSLConfig(dino=DINO)),
    "dino-vit": (VIT, SSLConfig(dino=DINO)),
}


def anatomy(spatial_dims: int, batch: int = 6) -> torch.Tensor:
    """Crops of nibabel's real T1 (33, 41, 25), scaled to [0, 1]: (B, 1, 16, 16[, 16])."""
    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    vol = np.asarray(nibabel.load(path).get_fdata(), dtype=np.float32)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    crops = [vol[2 * i:16 + 2 * i, 4 + 3 * i:20 + 3 * i, 4:20] for i in range(batch)]
    x = torch.from_numpy(np.stack(crops))[:, None]
    return x if spatial_dims == 3 else x[..., 8]


def train_losses(method, batch, steps, lr=2e-3, key="loss"):
    opt = torch.optim.AdamW(method.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    streams = [m for m in method.modules() if isinstance(m, ViewStream)]
    for _ in range(steps):
        for stream in streams:  # same views and masks every step: the loss must fall by optimisation alone
            stream.calls = 0
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step()  # as the loop does: DINO's teacher follows the student
        losses.append(float(out[key]))
    return losses, out


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_is_finite_and_decreases(case, spatial_dims):
    encoder, ssl = CASES[case]
    torch.manual_seed(1)
    cfg = PretrainConfig(encoder=encoder, ssl=ssl, views=VIEWS, crop=[16] * spatial_dims)
    method = build_method(cfg, spatial_dims)
    assert isinstance(method.encoder, torch.nn.Module)
    # DINO's loss is the targets' entropy (moved by centring, not by the student) + KL(target || student):
    # what its optimisation must lower is the KL
    key = "loss_kl" if method_name(cfg) == "dino" else "loss"
    losses, out = train_losses(method, {"image": anatomy(spatial_dims)}, steps=6, key=key)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses
    expected = {"contrastive": {"loss_contrastive"}, "masked": {"loss_masked"},
                "masked+contrastive": {"loss_masked", "loss_contrastive"},
                "vicreg": {"loss_invariance", "loss_variance", "loss_covariance"},
                "dino": {"loss_dino", "loss_kl", "teacher_entropy"}}[method_name(cfg)]
    assert expected <= set(out) and out["loss"].ndim == 0


def test_combined_loss_is_the_weighted_sum():
    cfg = PretrainConfig(encoder=VIT, views=VIEWS, crop=[16, 16], ssl=SSLConfig(
        masked=MASKED.model_copy(update={"weight": 0.5}),
        contrastive=CONTRASTIVE.model_copy(update={"weight": 2.0})))
    method = build_method(cfg, 2)
    out = method({"image": anatomy(2)})
    assert method.encoder is method.mae.encoder  # one encoder, stored once in checkpoints
    assert not any(key.startswith("encoder.") for key in method.state_dict())
    assert float(out["loss"]) == pytest.approx(0.5 * float(out["loss_masked"]) + 2 * float(out["loss_contrastive"]),
                                               rel=1e-5)


def test_patient_positives_use_the_pair():
    cfg = PretrainConfig(encoder=RESNET, views=VIEWS, crop=[16, 16],
                         ssl=SSLConfig(contrastive=CONTRASTIVE.model_copy(update={"positives": "patient"})))
    method = build_method(cfg, 2).eval()
    x = anatomy(2)
    method.stream.calls = 0  # the same views for both calls
    same = float(method({"image": x, "pair": x})["loss"])
    method.stream.calls = 0
    shuffled = float(method({"image": x, "pair": x.flip(0)})["loss"])  # positives now mismatched
    assert shuffled > same
    # no pair in the batch: falls back to two views of the image
    assert np.isfinite(float(method({"image": x})["loss"]))


def test_masked_with_resnet_is_a_config_error():
    cfg = PretrainConfig(encoder=RESNET, ssl=SSLConfig(masked=MASKED), crop=[16, 16])
    with pytest.raises(ConfigError, match="needs a ViT encoder"):
        build_method(cfg, 2)


def test_crop_of_the_wrong_dimension_is_a_config_error():
    with pytest.raises(ConfigError, match="pretrain.crop"):
        build_method(PretrainConfig(crop=[16, 16, 16]), 2)


@pytest.mark.parametrize("spatial_dims,channels", [(3, 1), (2, 3)])
def test_visible_patch_embedding_equals_the_conv_then_gather(spatial_dims, channels):
    """MAE embeds only the visible patches with the patch conv's weights as a matrix: same tokens and same
    weight gradients as MONAI's conv over all patches followed by the gather."""
    from medssl.models.vit import ViTEncoder
    from medssl.models.patchify import random_masking
    torch.manual_seed(0)
    enc = ViTEncoder(channels, [32] * spatial_dims, 8, 48, 1, 2, 64, spatial_dims)
    x = torch.randn(3, channels, *[32] * spatial_dims, dtype=torch.float64)
    enc = enc.double()
    keep, _, _ = random_masking(3, enc.num_patches, 0.75, x.device)
    fast = enc.embed_visible(x, keep)
    full = enc.patch_embed(x)
    reference = torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, 48))
    torch.testing.assert_close(fast, reference)
    weight = enc.patch_embed.patch_embeddings.weight
    grad_fast, = torch.autograd.grad(fast.square().sum(), weight)
    grad_ref, = torch.autograd.grad(reference.square().sum(), weight)
    torch.testing.assert_close(grad_fast, grad_ref)


def test_dino_teacher_is_the_ema_of_the_student_and_not_optimised():
    from medssl.train.schedule import build_optimizer
    from medssl.config import TrainConfig
    cfg = PretrainConfig(encoder=RESNET, ssl=SSLConfig(dino=DINO), views=VIEWS, crop=[16, 16])
    method = build_method(cfg, 2)
    optimised = {id(p) for g in build_optimizer(method, TrainConfig(), torch.device("cpu")).param_groups
                 for p in g["params"]}
    assert not any(id(p) in optimised for p in method.teacher.parameters())
    assert all(id(p) in optimised for p in method.encoder.parameters())
    before = [p.clone() for p in method.teacher.parameters()]
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)  # move the student
    student = [p.clone() for p in list(method.encoder.parameters()) + list(method.head.parameters())]
    method.after_step()
    m = DINO.teacher_momentum
    for t, old, s in zip(method.teacher.parameters(), before, student):
        torch.testing.assert_close(t, m * old + (1 - m) * s)
    keys = method.state_dict()  # the teacher is checkpointed (resume continues it), under its own keys
    assert any(k.startswith("teacher.encoder.") for k in keys) and any(k.startswith("encoder.") for k in keys)


def test_other_methods_have_the_after_step_hook():
    cfg = PretrainConfig(encoder=RESNET, views=VIEWS, crop=[16, 16])
    method = build_method(cfg, 2)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    method.after_step()  # SimCLR: nothing outside the optimizer, so nothing changes
    assert all(torch.equal(state[k], v) for k, v in method.state_dict().items())


def test_two_standalone_methods_is_a_config_error():
    with pytest.raises(ValueError, match="cannot be combined"):
        SSLConfig(vicreg=VICRegConfig(), dino=DINO)


def test_the_training_loop_moves_the_dino_teacher(tmp_path):
    """train() calls after_step() after each update: the teacher follows the student, and a checkpoint holds it."""
    from medssl.config import TrainConfig
    from medssl.train.loop import train

    class Log:
        def log_metrics(self, *args, **kwargs):
            pass
    cfg = PretrainConfig(encoder=RESNET, ssl=SSLConfig(dino=DINO), views=VIEWS, crop=[16, 16])
    method = build_method(cfg, 2)
    before = [p.clone() for p in method.teacher.parameters()]
    batches = [{"image": anatomy(2)}] * 4
    result = train(method, lambda epoch, position: batches[position:], TrainConfig(steps=2, checkpoint_every=2),
                   tmp_path, Log(), "cpu")
    assert result["step"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, method.teacher.parameters()))
    from medssl.train.checkpoint import load_checkpoint
    saved = load_checkpoint(result["checkpoint"])["model"]
    torch.testing.assert_close(saved["teacher.head.prototypes"], method.teacher["head"].prototypes)
