"""What a network can read from a synthetic hand distribution: reference PA-MPVPE scores of ideal partial
predictions against hands drawn by synthetic.py's sampler (`synthetic.sample_hand`).

  mean hand             MANO mean fingers, zero betas (what a network that reads nothing predicts)
  first component       the true coefficient of the first PCA pose axis (the hand's closure), the other axes at
                        the mean, zero betas
  first five            the first five axes right
  true fingers          the true finger pose, zero betas (the shape alone left wrong)
Errors are the official aligned vertex error (engine.procrustes), global rotation and translation aside.

Run:  python scripts/synth_reference.py                              # the synthetic.py defaults
      python scripts/synth_reference.py --pose_components 45 --pose_noise 0.08
"""
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import synthetic  # noqa: E402
from engine import config_from_cli, option, procrustes  # noqa: E402
from mano import MANO  # noqa: E402


@dataclass
class ReferenceConfig:
    """Reference PA-MPVPE scores of ideal partial predictions on synthetic.py's hand distribution."""
    n: int = option(600, 'hands drawn')
    seed: int = option(0, 'random seed')
    mano: str = option('synthetic', "MANO model: 'synthetic' or a MANO_RIGHT.pkl path")
    pose_components: int = option(synthetic.HandSampler.pose_components, 'as synthetic.py')
    pose_noise: float = option(synthetic.HandSampler.pose_noise, 'as synthetic.py')


def reference_scores(cfg):
    """{prediction: PA-MPVPE in mm} over cfg.n hands of the sampler's distribution."""
    model = synthetic.mano_model(cfg.mano)
    layer, prior = MANO(model), synthetic.pose_prior(model)
    sampler = synthetic.HandSampler(pose_components=cfg.pose_components, pose_noise=cfg.pose_noise)
    frame = synthetic.rest_frame(layer(torch.zeros(1, 48)).joints[0].double().numpy())
    rng = np.random.default_rng(cfg.seed)
    poses, betas = (np.stack(x) for x in zip(*[synthetic.sample_hand(rng, prior, frame, sampler) for _ in range(cfg.n)]))
    fingers = poses[:, 3:]                                                      # (n, 45) absolute
    coeffs = (fingers - prior['mean']) @ prior['components'].T                  # (n, 45) on the PCA axes
    first = lambda k: prior['mean'] + coeffs[:, :k] @ prior['components'][:k]  # noqa: E731
    zero = np.zeros_like(betas)
    candidates = {'mean hand': (np.tile(prior['mean'], (cfg.n, 1)), zero), 'first component': (first(1), zero),
                  'first five': (first(5), zero), 'true fingers, zero betas': (fingers, zero)}
    mesh = lambda f, b: layer(torch.as_tensor(np.concatenate([np.zeros((cfg.n, 3)), f], 1), dtype=torch.float32),  # noqa: E731
                              torch.as_tensor(b, dtype=torch.float32)).vertices.double()
    with torch.no_grad():
        gt = mesh(fingers, betas)
        return {name: 1000 * float((procrustes(mesh(f, b), gt) - gt).norm(dim=-1).mean())
                for name, (f, b) in candidates.items()}


def main(argv=None):
    cfg = config_from_cli(ReferenceConfig, argv)
    scores = reference_scores(cfg)
    print(json.dumps(dataclasses.asdict(cfg)))
    for name, mm in scores.items():
        print(f'{name:28s} PA-MPVPE {mm:6.2f} mm')
    return scores


if __name__ == '__main__':
    main()
