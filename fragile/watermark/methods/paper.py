"""The paper's method (Yin, Yin, Zhang, ICIP 2022): a generator trained with the secret-key loss.

A randomly initialised progressive-GAN generator maps a fixed latent batch to images; only the generator
is trained, against the frozen classifier, with ``CE(f(G(z)), key) + lambda * var(softmax(f(G(z))))``.
The variance term flattens the softmax, pulling the triggers toward decision boundaries; the CE term
keeps each on its key label. Ours differs in one place: it stops once every *8-bit* trigger carries its
key label, since the 8-bit images are what gets deployed.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.cli import UserError, progress_bar
from ...core.data import to_float
from ..trigger_io import quantize


@dataclass(frozen=True)
class PaperParams:
    """The defaults are the paper's code's (generate_samples.py's header holds the same values)."""
    latent_dim: int = 512
    latent_seed: int = 0     # the fixed latent batch (and the generator's initialisation) come from this seed
    gen_channels: int = 512  # generator width at its first stage, halving per stage
    lam: float = 150.0       # weight of the softmax-variance term
    lr: float = 1e-4         # Adam
    beta1: float = 0.5
    beta2: float = 0.999
    max_steps: int = 2000    # step cap; generation stops as soon as every 8-bit trigger carries its key label


@dataclass(frozen=True)
class GeneratorRecipe:
    """A generator width and learning rate that replace the paper's (``--recipe``)."""
    gen_channels: int
    lr: float


# The paper's code trains a 512-wide generator with Adam lr 1e-4: recipe "paper" (None: the header's values as
# they are, PaperParams' defaults unless a flag changed them). With Adam the step per weight is what lr sets, so a
# narrower generator needs a larger lr to move its images as fast: "fast" (docs/speed.md has its timings). Loss,
# lambda, betas and stopping rule are shared.
RECIPES = {"paper": None, "fast": GeneratorRecipe(gen_channels=64, lr=3e-3)}


def paper_loss(logits, key, lam):
    """CE(f(G(z)), key) + lambda * var(softmax(f(G(z)))), the variance over every entry (no dim)."""
    return F.cross_entropy(logits, key) + lam * F.softmax(logits, dim=1).var()


def generate(job, p):
    """Train the generator on a fixed latent batch against the frozen model until every 8-bit trigger carries
    its key label (checked on the quantized images). Returns (uint8 triggers, info)."""
    from models import ProGANGenerator

    model, key, device, log = job.model, job.key, job.device, job.log
    key_t = torch.tensor(key, device=device)
    latent_gen = torch.Generator().manual_seed(p.latent_seed)
    z = torch.randn(len(key), p.latent_dim, generator=latent_gen).to(device)
    torch.manual_seed(p.latent_seed)
    generator = ProGANGenerator(job.spec.shape, p.latent_dim, p.gen_channels).to(device)
    optimizer = torch.optim.Adam(generator.parameters(), lr=p.lr, betas=(p.beta1, p.beta2))
    model.eval().requires_grad_(False)
    matched = 0
    bar = progress_bar(range(1, p.max_steps + 1), desc="generator steps", enabled=job.progress)
    for step in bar:
        logits = model(generator(z))
        loss = paper_loss(logits, key_t, p.lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float_matched = (logits.argmax(1) == key_t).sum().item()
        if float_matched >= len(key) - 2 or step % 25 == 0:  # the 8-bit check only when it can pass (or to log)
            with torch.no_grad():
                triggers = quantize(generator(z))
                matched = (model(to_float(triggers)).argmax(1) == key_t).sum().item()
            bar.set_postfix(loss=f"{loss.item():.4f}", on_key=f"{matched}/{len(key)}")
            if not job.progress and step % 25 == 0:  # without a bar, a log line every 25 steps says how far it got
                log(f"step {step}: loss {loss.item():.4f}, 8-bit triggers on key {matched}/{len(key)}")
            if matched == len(key):
                bar.close()
                log(f"generator: every 8-bit trigger on its key label after {step} steps")
                return triggers.cpu(), {"steps": step, "latents": z.cpu()}
    raise UserError(f"the generator did not put every 8-bit trigger on its key label within {p.max_steps} "
                    f"steps ({matched}/{len(key)}): raise --max-steps or --lr")
