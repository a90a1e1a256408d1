"""Autoregressive model (ARM) of 8x8 Digits: p(x) = prod_i p(x_i | x_<i) over the 64 pixels in
raster order, each conditional a categorical over the 17 pixel values 0..16.

The conditionals come from a stack of causal 1D convolutions over the raster sequence (as in
intro_dgm's ARM, after van den Oord et al. 2016, "Pixel Recurrent Neural Networks" / WaveNet),
with residual connections, so that the output at position i sees only pixels < i. The exact test
NLL is the summed cross-entropy, in nats per image. Sampling is ancestral, one pixel at a time.

Run:  python autoregressive_model.py            # defaults, writes results/ARM_*
      python autoregressive_model.py --help
"""

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


class ARM(nn.Module):
    name = "ARM"
    nll_kind = "exact"
    objective = "NLL (nats/image)"

    def __init__(self, channels=64, layers=6, kernel_size=9, dropout=0.4, weight_decay=0.05):
        super().__init__()
        self.weight_decay = weight_decay
        self.embed = nn.Embedding(common.NUM_LEVELS, channels)
        self.start = nn.Parameter(torch.zeros(channels))  # stands in for "pixel -1"
        self.position = nn.Parameter(torch.zeros(channels, common.NUM_PIXELS))  # raster position
        self.convs = nn.ModuleList(CausalConv1d(channels, kernel_size) for _ in range(layers))
        # LayerNorm over channels at each position (a norm over positions would leak the future)
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
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

    @torch.no_grad()
    def sample(self, n):
        """Ancestral sampling: x_i ~ p(x_i | x_<i), i = 0..63 (64 passes of the network)."""
        x = torch.zeros(n, common.NUM_PIXELS, dtype=torch.long, device=self.start.device)
        for i in range(common.NUM_PIXELS):
            probs = F.softmax(self.logits(x)[:, i], dim=-1)  # (n, 17)
            x[:, i] = torch.multinomial(probs, 1).squeeze(1)
        return x.float()

    def configure_optimizer(self, lr):
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=self.weight_decay)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = common.make_parser(__file__, __doc__, epochs=300, batch_size=64, lr=2e-3, patience=20,
                                gif_every=5)
    group = parser.add_argument_group("ARM")
    group.add_argument("--channels", type=common.positive_int, default=64,
                       help="channels of the causal convolutions (default %(default)s)")
    group.add_argument("--layers", type=common.positive_int, default=6,
                       help="number of residual causal convolution layers (default %(default)s)")
    group.add_argument("--kernel-size", type=common.positive_int, default=9,
                       help="kernel size; 9 sees the pixel above and its left neighbour (default %(default)s)")
    group.add_argument("--dropout", type=common.unit_interval, default=0.4,
                       help="dropout on each residual branch (default %(default)s)")
    group.add_argument("--weight-decay", type=common.nonnegative_float, default=0.05,
                       help="AdamW weight decay (default %(default)s)")
    args = common.parse_args(parser, argv)
    config = dict(channels=args.channels, layers=args.layers, kernel_size=args.kernel_size,
                  dropout=args.dropout, weight_decay=args.weight_decay)
    common.run(args, build_model=lambda: ARM(**config), config=config)


if __name__ == "__main__":
    main()
