"""Autoregressive model (ARM) of 8x8 Digits: p(x) = prod_i p(x_i | x_<i) over the 64 pixels in
raster order, each conditional a categorical over the 17 pixel values 0..16.

The conditionals come from a stack of causal 1D convolutions over the raster sequence (as in
intro_dgm's ARM, after van den Oord et al. 2016, "Pixel Recurrent Neural Networks" / WaveNet),
with residual connections, so that the output at position i sees only pixels < i. The exact test
NLL is the summed cross-entropy, in nats per image. Sampling is ancestral, one pixel at a time,
each layer caching what it saw at earlier positions, so that a pixel costs one position of the
network instead of a full pass.

Run:  python autoregressive_model.py            # defaults, writes results/ARM_*
      python autoregressive_model.py --help
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common

# -----------------------------------------------------------------------------
# model


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only: output t depends on inputs <= t."""

    def __init__(self, channels, kernel_size, dilation=1):
        super().__init__(channels, channels, kernel_size, dilation=dilation)
        self.left_pad = (kernel_size - 1) * dilation

    def forward(self, h):  # (B, C, 64) -> (B, C, 64)
        return super().forward(F.pad(h, (self.left_pad, 0)))


@dataclass(frozen=True)
class ARMConfig:
    channels: int = common.option(64, "channels of the causal convolutions", type=common.positive_int)
    layers: int = common.option(6, "number of residual causal convolution layers", type=common.positive_int)
    kernel_size: int = common.option(9, "kernel size; 9 sees the pixel above and its left neighbour",
                                     type=common.positive_int)
    dropout: float = common.option(0.4, "dropout on each residual branch", type=common.unit_interval)
    weight_decay: float = common.option(0.05, "AdamW weight decay", type=common.nonnegative_float)


class ARM(common.DigitsModel):
    name = "ARM"
    nll_kind = "exact"
    objective = "NLL (nats/image)"
    Config = ARMConfig

    def __init__(self, config=None, sampling=None):
        super().__init__(config, sampling)
        channels, layers = self.config.channels, self.config.layers
        self.embed = nn.Embedding(common.NUM_LEVELS, channels)
        self.start = nn.Parameter(torch.zeros(channels))  # stands in for "pixel -1"
        self.position = nn.Parameter(torch.zeros(channels, common.NUM_PIXELS))  # raster position
        self.convs = nn.ModuleList(CausalConv1d(channels, self.config.kernel_size) for _ in range(layers))
        # LayerNorm over channels at each position (a norm over positions would leak the future)
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(layers))
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Conv1d(channels, common.NUM_LEVELS, 1)

    def logits(self, x):
        """x: (B, 64) integer pixels -> logits (B, 64, 17) of p(x_i | x_<i)."""
        embedded = self.embed(x)  # (B, 64, C)
        start = self.start.expand(len(x), 1, -1)
        # shift right by one: position i holds pixel i - 1, so a causal conv at i sees x_<i
        h = torch.cat([start, embedded[:, :-1]], dim=1).transpose(1, 2) + self.position  # (B, C, 64)
        for conv, norm in zip(self.convs, self.norms):
            h = h + self.dropout(F.gelu(conv(norm(h.transpose(1, 2)).transpose(1, 2))))
        return self.head(h).transpose(1, 2)  # (B, 64, 17)

    def nll(self, x):
        """x: (B, 64) float pixels 0..16 -> (B,) -log p(x) in nats."""
        target = x.round().long()
        logits = self.logits(target)
        return F.cross_entropy(logits.reshape(-1, common.NUM_LEVELS), target.reshape(-1),
                               reduction="none").view(len(x), -1).sum(1)

    def loss(self, x):
        return self.nll(x).mean()

    def test_nll(self, x):
        return self.nll(x)

    def empty_caches(self, n):
        """Per layer, the normalised inputs of the last kernel_size positions: (n, C, K) zeros,
        the causal convolution's left padding."""
        return [self.position.new_zeros(n, conv.in_channels, conv.kernel_size[0]) for conv in self.convs]

    def next_logits(self, previous, i, caches):
        """Logits (n, 17) of p(x_i | x_<i), computed at position i alone: previous (n,) is pixel
        i - 1 (None at i = 0) and caches (from empty_caches, updated in place) hold what each layer
        saw at the positions before i (fast WaveNet generation, Paine et al. 2016)."""
        h = self.start.expand(len(caches[0]), -1) if previous is None else self.embed(previous)  # (n, C)
        h = h + self.position[:, i]
        for layer, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            caches[layer] = torch.cat([caches[layer][:, :, 1:], norm(h)[:, :, None]], dim=2)  # (n, C, K)
            out = torch.einsum("nck,ock->no", caches[layer], conv.weight) + conv.bias  # conv at position i
            h = h + self.dropout(F.gelu(out))
        return self.head(h[:, :, None])[:, :, 0]  # (n, 17)

    @torch.no_grad()
    def sample(self, n):
        """Ancestral sampling: x_i ~ p(x_i | x_<i), i = 0..63, one position of the network per
        pixel thanks to the caches (the same distribution as 64 full passes; tests check it)."""
        x = torch.zeros(n, common.NUM_PIXELS, dtype=torch.long, device=self.device)
        caches, previous = self.empty_caches(n), None
        for i in range(common.NUM_PIXELS):
            probs = F.softmax(self.next_logits(previous, i, caches), dim=-1)  # (n, 17)
            x[:, i] = previous = torch.multinomial(probs, 1).squeeze(1)
        return x.float()

    def configure_optimizer(self, lr):
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=self.config.weight_decay)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = common.make_parser(__file__, __doc__, epochs=300, batch_size=64, lr=2e-3, patience=20,
                                gif_every=5)
    common.add_options(parser, "ARM", ARMConfig)
    args = common.parse_args(parser, argv)
    common.run(args, ARM, common.options_from(args, ARMConfig))


if __name__ == "__main__":
    main()
