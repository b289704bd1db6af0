"""Similar and adversarial generators (Charachon et al. 2022; the review's Eq. 27): the map is
|g_s(x) - g_a(x)|, the difference between an image the model still classifies as x and one it does not,
both produced from the same latent ("adversarial") space. Trainable and stored per model version."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xai_plugins import Explainer, XAIError
from xai_plugins.toolkit import preserved_model

from .examples import display


class TwoGenerators(nn.Module):
    """A shared encoder E and two decoders; g_s(x) = x + D_s(E(x)), g_a(x) = x + D_a(E(x)).

    Residual outputs: both start (nearly) at the identity, and since the map is their difference, the
    reconstruction error they share cancels (the point of subtracting two generated images)."""

    def __init__(self, channels: int = 3, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.LeakyReLU(0.2),
        )
        self.similar = self._decoder(channels, width)
        self.adversarial = self._decoder(channels, width)

    @staticmethod
    def _decoder(channels: int, width: int) -> nn.Sequential:
        last = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.normal_(last.weight, std=1e-3)  # near the identity, yet every layer gets gradients
        nn.init.zeros_(last.bias)
        return nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            last,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, width % 2, 0, height % 2), mode="replicate")
        code = self.encoder(padded)
        similar = self.similar(code)[..., :height, :width]
        adversarial = self.adversarial(code)[..., :height, :width]
        return x + similar, x + adversarial


class PatchDiscriminator(nn.Module):
    """The GAN discriminator D of Charachon et al.: real images vs generated ones, a small PatchGAN
    (one logit per receptive field; Isola et al. 2017's pix2pix discriminator, which they build on)."""

    def __init__(self, channels: int = 3, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """The standard (non-saturating) GAN cross-entropy: BCE of D's logits against real / fake."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


def class_cross_entropy(logits: torch.Tensor, label: torch.Tensor, keep_class: bool = True) -> torch.Tensor:
    """The paper's classification terms: CE(f(g_s(x)), y) to keep class y; for g_a the cross-entropy
    of the opposite outcome, -log(1 - p_y) (the binary paper's CE against the other class, written
    for any number of classes)."""
    if keep_class:
        return F.cross_entropy(logits, label)
    log_p = torch.log_softmax(logits, 1).gather(1, label.view(-1, 1)).squeeze(1)
    return -torch.log1p(-log_p.exp().clamp(max=1 - 1e-6)).mean()


def margin(logits: torch.Tensor, label: torch.Tensor, kappa: float, keep_class: bool = True) -> torch.Tensor:
    """Carlini & Wagner's hinge on the logit margin m = z_y - max_{k != y} z_k: mean of
    relu(kappa - m) to keep class y, of relu(m + kappa) to leave it. It stops pushing once the
    prediction is kept / changed by kappa, leaving the rest to the reconstruction term."""
    z_y = logits.gather(1, label.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, label.view(-1, 1), float("-inf")).amax(1)
    m = z_y - others
    return torch.relu(kappa - m).mean() if keep_class else torch.relu(m + kappa).mean()


class AdversarialGenerators(Explainer):
    """Two-generator explanation of Charachon et al. (2022; review Eq. 27): map = |g_s(x) - g_a(x)|.

    ``fit`` trains, with the model frozen, a shared encoder and two decoders on the fit data:
    L_s = h_keep(f(g_s(x)), y) + rec * |g_s(x) - x|_1 keeps the model's prediction y = argmax f(x);
    L_a = h_leave(f(g_a(x)), y) + rec * |g_a(x) - x|_1 changes it (to the nearest other class; the
    paper's binary setting flips to the other class), with Carlini & Wagner's logit-margin hinges
    (``margin`` = kappa) in place of the paper's cross-entropies, so that a generator stops pushing
    once its role is fulfilled; both generators share the latent space of E (our
    reading of "trained from the same adversarial space"). Adam (``lr``) for ``fit_steps`` batches of
    ``fit_batch``; checkpoints to ``checkpoint_path`` every 50 steps and resumes from it.
    ``attributions`` are g_s(x) - g_a(x); extras hold both generated images and their predictions.

    ``loss="paper"`` trains as Charachon et al. do instead: cross-entropy classification terms
    (CE(f(g_s(x)), y) and -log(1 - p_y(g_a(x)))) and a discriminator D (``PatchDiscriminator``) with
    the GAN cross-entropy, weight ``adv``: D learns real x vs g_s(x), g_a(x); each generator adds
    ``adv`` * BCE(D(g(x)), real). ``loss="margin"`` (default) is the variant above, no discriminator.
    Measured on the reference CNN and `shapes` (``python -m bench.generators``, 400 steps, 64 held-out
    images): see the README section "Two generators: paper loss vs margin hinges".
    """

    name = "adversarial_generators"
    space = "input"
    trainable = True
    params = {
        "fit_steps": 400,
        "fit_batch": 32,
        "lr": 5e-3,
        "rec": 0.5,
        "margin": 1.0,
        "width": 16,
        "seed": 0,
        "loss": "margin",
        "adv": 0.05,
    }
    fit_params = ("fit_steps", "fit_batch", "lr", "rec", "margin", "width", "seed", "loss", "adv")
    LOSSES = ("margin", "paper")

    net: TwoGenerators | None = None
    disc: PatchDiscriminator | None = None
    disc_opt: torch.optim.Optimizer | None = None
    checkpoint_path: Any = None

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.config["loss"] not in self.LOSSES:
            raise XAIError(
                f"adversarial_generators: loss must be one of {', '.join(self.LOSSES)}, "
                f"not {self.config['loss']!r}"
            )

    def losses(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            keep = model(x).argmax(1)
        similar, adversarial = self.net(x)
        out_s, out_a = model(similar), model(adversarial)
        cfg = self.config
        rec = cfg["rec"] * ((similar - x).abs().mean() + (adversarial - x).abs().mean())
        if cfg["loss"] == "margin":
            loss = (
                margin(out_s, keep, cfg["margin"])
                + margin(out_a, keep, cfg["margin"], keep_class=False)
                + rec
            )
        else:
            self.discriminator_step(x, similar.detach(), adversarial.detach())
            fooling = gan_loss(self.disc(similar), True) + gan_loss(self.disc(adversarial), True)
            loss = (
                class_cross_entropy(out_s, keep)
                + class_cross_entropy(out_a, keep, keep_class=False)
                + rec
                + cfg["adv"] * fooling
            )
        stats = {
            "keep_rate": float((out_s.argmax(1) == keep).float().mean()),
            "change_rate": float((out_a.argmax(1) != keep).float().mean()),
        }
        return loss, stats

    def discriminator_step(self, real: torch.Tensor, *fakes: torch.Tensor) -> None:
        """One Adam step of D on the GAN cross-entropy: real images 1, generated ones 0."""
        loss = gan_loss(self.disc(real), True) + sum(gan_loss(self.disc(f), False) for f in fakes) / len(
            fakes
        )
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()

    def fit(self, model: nn.Module, data: Any) -> dict[str, Any]:
        cfg = self.config
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        torch.manual_seed(cfg["seed"])
        self.net = TwoGenerators(data.inputs.shape[1], cfg["width"]).to(device)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg["lr"])
        if cfg["loss"] == "paper":
            self.disc = PatchDiscriminator(data.inputs.shape[1], cfg["width"]).to(device)
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg["lr"], betas=(0.5, 0.999))
        step, stats = self._resume(opt), {}
        with preserved_model(model, restore_values=False), torch.enable_grad():
            while step < cfg["fit_steps"]:
                for xb, _ in data.batches(cfg["fit_batch"], shuffle=True, seed=cfg["seed"] + step):
                    loss, stats = self.losses(model, xb.to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    if step % 50 == 0:
                        self._checkpoint(opt, step)
                    if step >= cfg["fit_steps"]:
                        break
        return {
            "generators": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "channels": int(data.inputs.shape[1]),
            "width": int(cfg["width"]),
            "steps": step,
            **{f"train_{k}": v for k, v in stats.items()},
        }

    def _resume(self, opt: torch.optim.Optimizer) -> int:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return 0
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(saved["generators"])
        opt.load_state_dict(saved["optimizer"])
        if self.disc is not None and "discriminator" in saved:
            self.disc.load_state_dict(saved["discriminator"])
            self.disc_opt.load_state_dict(saved["discriminator_optimizer"])
        return int(saved["step"])

    def _checkpoint(self, opt: torch.optim.Optimizer, step: int) -> None:
        if self.checkpoint_path is not None:
            saved = {"generators": self.net.state_dict(), "optimizer": opt.state_dict(), "step": step}
            if self.disc is not None:
                saved.update(
                    discriminator=self.disc.state_dict(), discriminator_optimizer=self.disc_opt.state_dict()
                )
            torch.save(saved, self.checkpoint_path)

    def load_state(self, state: dict[str, Any]) -> None:
        self.net = TwoGenerators(state["channels"], state["width"])
        self.net.load_state_dict(state["generators"])
        self.net.eval()
        self.fit_stats = {k: v for k, v in state.items() if k.startswith("train_")}

    def explain(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        if self.net is None:
            raise XAIError("adversarial_generators is not fitted: pass fit_data (or fit it first)")
        self.net.to(inputs.device)
        with torch.no_grad():
            similar, adversarial = self.net(inputs)
            pred_s, pred_a = model(similar).argmax(1), model(adversarial).argmax(1)
        extras = {
            "similar_prediction": pred_s.cpu(),
            "adversarial_prediction": pred_a.cpu(),
            "images": {
                "similar": display(similar, inputs).cpu(),
                "adversarial": display(adversarial, inputs).cpu(),
            },
            "fit": dict(getattr(self, "fit_stats", {})),
        }
        return similar - adversarial, extras
