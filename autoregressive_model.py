"""Autoregressive model (ARM) of 8x8 Digits: p(x) = prod_i p(x_i | x_<i) over the 64 pixels in
raster order, each conditional a categorical over the 17 pixel values 0..16.

The conditionals come from a gated PixelCNN (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders"): a vertical stack of convolutions sees the rows above a pixel,
a horizontal stack sees the pixels to its left in its row and takes the vertical stack's features,
so pixel i sees exactly the pixels < i, every one of them (no blind spot), through gated residual
layers tanh(a) * sigmoid(b). The exact test NLL is the summed cross-entropy, in nats per image.
With 1000 training digits the network overfits fast; besides dropout, weight decay and an EMA of
the weights, "context dropout" hides random input pixels from later conditionals while training
(the targets and the evaluated likelihood stay whole). The model is a small ensemble: `members`
independent PixelCNNs, each trained on its own NLL, and each conditional of the model is the mean
of their probabilities, p(x_i | x_<i) = 1/K sum_k p_k(x_i | x_<i), still a product of normalised
conditionals, so the likelihood stays exact (early stopping watches the ensemble's val NLL).
A learned position embedding tells the stacks where in the image a pixel is. Sampling
is ancestral, one pixel at a time: the vertical stacks compute a row once it is complete, the
horizontal stacks one position per pixel from what each layer cached, so that a pixel costs one
position of each network instead of a full pass.

Conditional model (--conditional): p(x | y) = prod_i p(x_i | x_<i, y) by the conditional PixelCNN
of the same paper, the class y entering every layer as a learned bias of its pre-activation: the
first layer's stacks get V_y, every gated layer tanh(a + V_y^a) * sigmoid(b + V_y^b) on both stacks
(each member its own biases), in the full pass and the cached sampler alike. The likelihood stays
exact, so the generative classifier argmax_y log p(x | y) + log p(y) needs the ten exact
conditional NLLs, one pass per class.

Run:  python autoregressive_model.py            # defaults, writes results/ARM_*
      python autoregressive_model.py --help
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common
from plumbing import runs

SIDE = 8  # the digits are SIDE x SIDE pixels

# -----------------------------------------------------------------------------
# model


def gate(t):  # (B, 2C, ...) -> (B, C, ...): tanh(a) * sigmoid(b), the gated activation unit
    a, b = t.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def biased(t, biases, k):  # t (B, C, ...) + the k-th class bias (B, C) at every position; t if unconditional
    return t if biases is None else t + biases[k].view(*biases[k].shape, *(1,) * (t.dim() - 2))


def pointwise(conv, t):  # a 1x1 conv at single positions: (n, C_in) -> (n, C_out)
    return F.linear(t, conv.weight[:, :, 0, 0], conv.bias)


class Stacks(nn.Module):
    """Kernels and padding of the vertical and horizontal stacks: the vertical stack at row r sees
    the rows above r only, the horizontal stack at (r, c) sees row r left of c (and, through the
    vertical stack, every row above), so pixel (r, c) sees exactly the pixels before it in raster
    order and no blind spot."""

    def __init__(self, channels, out, height, width, first):
        super().__init__()
        self.height, self.width, self.first = height, width, first
        self.vertical = nn.Conv2d(channels, out, (height, 2 * width + 1))  # rows r-height+1..r, cols c±width
        self.horizontal = nn.Conv2d(channels, out, (1, width + 1))  # cols c-width..c

    def pad_vertical(self, v):  # (B, C, 8, 8) -> rows padded above (shifted down one in the first layer)
        if self.first:
            return F.pad(v[:, :, :-1], (self.width, self.width, self.height, 0))
        return F.pad(v, (self.width, self.width, self.height - 1, 0))

    def pad_horizontal(self, h):  # (B, C, ..., 8) -> cols padded on the left (shifted one in the first layer)
        if self.first:
            return F.pad(h[..., :-1], (self.width + 1, 0))
        return F.pad(h, (self.width, 0))

    def vertical_row(self, v, r):  # the vertical conv at row r alone: (B, C, 8, 8) -> (B, out, 8)
        return self.vertical(self.pad_vertical(v)[:, :, r:r + self.height])[:, :, 0]

    def horizontal_at(self, row, c):  # the horizontal conv at (r, c) alone: row (B, C, 8) -> (B, out)
        window = self.pad_horizontal(row)[:, :, c:c + self.width + 1]  # (B, C, width + 1)
        return torch.einsum("nck,ock->no", window, self.horizontal.weight[:, :, 0]) + self.horizontal.bias


@dataclass(frozen=True)
class ARMConfig(common.ModelConfig):
    # the network's size: K members of C channels each; several small networks averaged beat fewer,
    # wider ones on the validation NLL (docs/choices.md, ARM)
    channels: int = common.option(12, "channels of both stacks of each member", type=common.positive_int)
    layers: int = common.option(4, "gated residual layers after the first (masked) one",
                                type=common.positive_int)
    width: int = common.option(2, "kernel half-width: each layer sees width columns either side in "
                               "the row above and width columns to the left", type=common.positive_int)
    # three regularisers, because the network overfits the 1000 training digits
    dropout: float = common.option(0.1, "dropout on each residual branch", type=common.unit_interval)
    context_dropout: float = common.option(0.1, "while training, the probability that a pixel is hidden "
                                           "from the conditionals of later pixels (its embedding zeroed); "
                                           "its own term of the NLL is kept", type=common.unit_interval)
    weight_decay: float = common.option(0.05, "AdamW weight decay", type=common.nonnegative_float)
    # convolutions are translation invariant; the embedding (2 x 64 x C numbers per member) lets a
    # layer know where in the 8x8 image it is
    position: bool = common.option(True, "no learned position embedding: the first layer's stacks see "
                                   "the pixel values alone, not where in the image each pixel is")
    members: int = common.option(3, "PixelCNNs trained side by side, each on its own NLL; each "
                                 "conditional is the mean of theirs", type=common.positive_int)


class PixelCNN(nn.Module):
    """One gated PixelCNN: logits of p(x_i | x_<i) in a full pass or one pixel at a time."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        C, width = config.channels, config.width
        self.embed = nn.Embedding(common.NUM_LEVELS, C)
        # the first layer sees strictly earlier pixels only, and enough rows above that each later
        # layer's one more row reaches the top of the image
        self.first = Stacks(C, C, max(1, SIDE - 1 - config.layers), width, first=True)
        self.first_link = nn.Conv2d(C, C, 1)  # vertical -> horizontal
        self.stacks = nn.ModuleList(Stacks(C, 2 * C, 2, width, first=False) for _ in range(config.layers))
        self.links = nn.ModuleList(nn.Conv2d(2 * C, 2 * C, 1) for _ in range(config.layers))
        self.outs = nn.ModuleList(nn.Conv2d(C, C, 1) for _ in range(config.layers))
        self.head = nn.Conv2d(C, common.NUM_LEVELS, 1)
        if config.position:
            self.pos_v = nn.Parameter(torch.zeros(C, SIDE, SIDE))
            self.pos_h = nn.Parameter(torch.zeros(C, SIDE, SIDE))
        if config.conditional:  # per class: a bias of the first layer's two stacks (C each) and of
            # every gated layer's two pre-activations (2C each), zero at the start
            self.classes = nn.Embedding(common.NUM_CLASSES, 2 * C + 4 * C * config.layers)
            nn.init.zeros_(self.classes.weight)

    def dropout(self, t):  # inverted dropout; torch.rand draws a mask about twice as fast as bernoulli_ on a CPU
        p = self.config.dropout
        if not self.training or p == 0:
            return t
        return t * (torch.rand_like(t) >= p) / (1 - p)

    def class_biases(self, y):
        """y (B,) classes -> [first vertical (B, C), first horizontal (B, C), then per gated layer
        vertical (B, 2C), horizontal (B, 2C)]; None for an unconditional network."""
        if not self.config.conditional:
            return None
        if y is None:
            raise ValueError("a conditional ARM needs the class labels y")
        C = self.config.channels
        return list(self.classes(y).split([C, C] + [2 * C] * (2 * self.config.layers), dim=1))

    def logits(self, x, y=None):
        """x: (B, 64) integer pixels, y (B,) classes of a conditional network -> logits (B, 64, 17)
        of p(x_i | x_<i) (or p(x_i | x_<i, y))."""
        biases = self.class_biases(y)
        e = self.embed(x).transpose(1, 2).reshape(len(x), -1, SIDE, SIDE)  # (B, C, 8, 8)
        if self.training and self.config.context_dropout > 0:  # a regulariser: the targets stay whole
            e = e * (torch.rand(len(x), 1, SIDE, SIDE, device=e.device) >= self.config.context_dropout)
        v = biased(self.first.vertical(self.first.pad_vertical(e)), biases, 0)
        if self.config.position:
            v = v + self.pos_v
        h = biased(self.first.horizontal(self.first.pad_horizontal(e)) + self.first_link(v), biases, 1)
        if self.config.position:
            h = h + self.pos_h
        for layer, (stack, link, out) in enumerate(zip(self.stacks, self.links, self.outs)):
            vv = biased(stack.vertical(stack.pad_vertical(v)), biases, 2 + 2 * layer)  # (B, 2C, 8, 8)
            hh = biased(stack.horizontal(stack.pad_horizontal(h)) + link(vv), biases, 3 + 2 * layer)
            v = v + self.dropout(gate(vv))
            h = h + self.dropout(out(gate(hh)))
        return self.head(F.elu(h)).flatten(2).transpose(1, 2)  # (B, 64, 17)

    def empty_caches(self, n, y=None):
        """What the sampler keeps between pixels: the embedded image so far, every layer's vertical
        stack (rows up to the current one) and its gated input on the current row, and every layer's
        horizontal stack on the current row, all zeros (= the convolutions' padding) to start; and
        the class biases of y (n,) for a conditional network."""
        C, L = self.config.channels, self.config.layers
        zeros = self.head.weight.new_zeros
        return dict(e=zeros(n, C, SIDE, SIDE), v=[zeros(n, C, SIDE, SIDE) for _ in range(L + 1)],
                    vv=[None] * L, h=[zeros(n, C, SIDE) for _ in range(L + 1)], biases=self.class_biases(y))

    def next_logits(self, previous, i, caches):
        """Logits (n, 17) of p(x_i | x_<i), computed at pixel i alone: previous (n,) is pixel i - 1
        (None at i = 0) and caches (from empty_caches, updated in place) hold what each layer computed
        before. At the start of a row the vertical stacks compute that row (it depends on the rows
        above only); every pixel then costs one position of the horizontal stacks (in eval mode)."""
        r, c = divmod(i, SIDE)
        e, v, vv, h = caches["e"], caches["v"], caches["vv"], caches["h"]
        biases = caches["biases"]
        if previous is not None:
            e[:, :, (i - 1) // SIDE, (i - 1) % SIDE] = self.embed(previous)
        if c == 0:
            v[0][:, :, r] = biased(self.first.vertical_row(e, r), biases, 0)
            if self.config.position:
                v[0][:, :, r] += self.pos_v[:, r]
            for layer, stack in enumerate(self.stacks):
                vv[layer] = biased(stack.vertical_row(v[layer], r), biases, 2 + 2 * layer)  # (n, 2C, 8)
                v[layer + 1][:, :, r] = v[layer][:, :, r] + gate(vv[layer])
        out = biased(self.first.horizontal_at(e[:, :, r], c) + pointwise(self.first_link, v[0][:, :, r, c]),
                     biases, 1)  # (n, C)
        if self.config.position:
            out = out + self.pos_h[:, r, c]
        h[0][:, :, c] = out
        for layer, (stack, link, proj) in enumerate(zip(self.stacks, self.links, self.outs)):
            hh = biased(stack.horizontal_at(h[layer], c) + pointwise(link, vv[layer][:, :, c]),
                        biases, 3 + 2 * layer)  # (n, 2C)
            out = out + pointwise(proj, gate(hh))
            h[layer + 1][:, :, c] = out
        return pointwise(self.head, F.elu(out))  # (n, 17)


def mean_of_softmaxes(logits):  # list of (..., 17) logits -> log of the mean of their softmaxes
    if len(logits) == 1:  # the logits themselves: the same softmax
        return logits[0]
    return torch.logsumexp(torch.stack([F.log_softmax(t, -1) for t in logits]), 0) - math.log(len(logits))


def summed_cross_entropy(logits, target):  # (B, 64, 17), (B, 64) -> (B,) nats
    return F.cross_entropy(logits.reshape(-1, common.NUM_LEVELS), target.reshape(-1),
                           reduction="none").view(len(target), -1).sum(1)


class ARM(common.DigitsModel):
    name = "ARM"
    nll_kind = "exact"
    objective = "NLL (nats/image)"
    Config = ARMConfig

    def __init__(self, config=None, sampling=None):
        super().__init__(config, sampling)
        self.nets = nn.ModuleList(PixelCNN(self.config) for _ in range(self.config.members))

    # --- van den Oord et al. 2016 (Conditional PixelCNN), eqs. 1-4: p(x) = prod_i p(x_i | x_<i)
    #     (given y), trained by its exact NLL, sampled ancestrally one pixel at a time ---

    def loss(self, x, y):
        """Each member is trained on its own NLL (the mean over members), so that they differ."""
        target = x.round().long()
        return torch.stack([summed_cross_entropy(net.logits(target, self.given(y)), target)
                            for net in self.nets]).mean()

    def eval_loss(self, x, y):
        """The ensemble's exact NLL (mean over the batch): what early stopping watches."""
        return self.nll(x, self.given(y)).mean()

    def test_nll(self, x, y=None):
        return self.nll(x, y)

    def nll(self, x, y=None):
        """x: (B, 64) float pixels 0..16 -> (B,) -log p(x) (or -log p(x | y)) in nats."""
        target = x.round().long()
        return summed_cross_entropy(self.logits(target, y), target)

    def logits(self, x, y=None):
        """x: (B, 64) integer pixels (y (B,) classes if conditional) -> logits (B, 64, 17) of
        p(x_i | x_<i) (or p(x_i | x_<i, y)), the members' mean."""
        return mean_of_softmaxes([net.logits(x, y) for net in self.nets])

    def given(self, y):  # the labels a network takes: y if conditional, None (ignored) if not
        return y if self.conditional else None

    @torch.no_grad()
    def sample(self, n, y=None):
        """Ancestral sampling: x_i ~ p(x_i | x_<i) (or p(x_i | x_<i, y), y (n,) the classes),
        i = 0..63, one position of each member per pixel thanks to the caches (the same
        distribution as 64 full passes; tests check it)."""
        x = torch.zeros(n, common.NUM_PIXELS, dtype=torch.long, device=self.device)
        caches, previous = self.empty_caches(n, y), None
        for i in range(common.NUM_PIXELS):
            probs = F.softmax(self.next_logits(previous, i, caches), dim=-1)  # (n, 17)
            x[:, i] = previous = torch.multinomial(probs, 1).squeeze(1)
        return x.float()

    def empty_caches(self, n, y=None):  # one set per member (see PixelCNN.empty_caches)
        return [net.empty_caches(n, y) for net in self.nets]

    def next_logits(self, previous, i, caches):
        """Logits (n, 17) of p(x_i | x_<i) at pixel i alone (see PixelCNN.next_logits)."""
        return mean_of_softmaxes([net.next_logits(previous, i, cache) for net, cache in zip(self.nets, caches)])

    def configure_optimizer(self, lr):
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=self.config.weight_decay, fused=True)

    # --- Beyond the paper: the generative classifier, inpainting (complete, missing_nll) ---

    def class_log_likelihoods(self, x):
        """Exact log p(x | y = c) for the ten classes: (B, 64) -> (B, 10), one pass of every image
        under each class label."""
        classes = torch.arange(common.NUM_CLASSES, device=x.device)
        nll = self.nll(x.repeat(common.NUM_CLASSES, 1), classes.repeat_interleave(len(x)))  # (10 B,)
        return -nll.view(common.NUM_CLASSES, len(x)).T

    @torch.no_grad()
    def ancestral_with_observed(self, x, missing, particles):
        """One ancestral pass per particle with the observed pixels fed in as they come: missing
        pixel i drawn from p(x_i | x_<i), observed pixel i kept, and its log p(x_i | x_<i) summed
        into the particle's log-weight. x (B, 64) pixels, missing (B, 64) bool -> completions
        (B, K, 64) and log-weights (B, K), K = particles. The proposal is q(x_m) = prod_{i in m}
        p(x_i | x_<i), so the weight p(x_o, x_m) / q(x_m) = prod_{i in o} p(x_i | x_<i): importance
        weights of p(x_m | x_o) (all equal when every missing pixel follows every observed one)."""
        target = x.round().long().repeat_interleave(particles, 0)  # (B K, 64)
        hidden = missing.repeat_interleave(particles, 0)
        log_w = target.new_zeros(len(target), dtype=x.dtype)
        caches, previous = self.empty_caches(len(target)), None
        for i in range(common.NUM_PIXELS):
            log_p = F.log_softmax(self.next_logits(previous, i, caches), dim=-1)  # (B K, 17)
            drawn = torch.multinomial(log_p.exp(), 1).squeeze(1)
            target[:, i] = previous = torch.where(hidden[:, i], drawn, target[:, i])
            log_w += torch.where(hidden[:, i], 0.0, log_p.gather(1, target[:, i:i + 1]).squeeze(1))
        return target.view(len(x), particles, common.NUM_PIXELS).to(x.dtype), log_w.view(len(x), particles)

    @staticmethod
    def follows_observed(missing):
        """(B, 64) bool -> (B,) True where every missing pixel comes after every observed one in
        raster order (a "suffix" mask, e.g. the bottom half): there ancestral sampling is exact."""
        return (missing.long().cummax(1).values == missing.long()).all(1)

    @torch.no_grad()
    def complete(self, x, missing, particles=8, chunk=4096):
        """Exact ancestral sampling of the missing pixels for suffix masks; for any other mask
        sampling-importance-resampling: `particles` ancestral passes with the observed pixels fed
        in, one kept with probability proportional to its weight prod_{i observed} p(x_i | x_<i)
        (consistent as particles grow; cheaper than Gibbs, whose every update needs 17 full passes
        per missing pixel). chunk: rows (digits x particles) per pass, for memory."""
        out = x.clone()
        suffix = self.follows_observed(missing)
        for rows, k in ((suffix.nonzero().squeeze(1), 1), ((~suffix).nonzero().squeeze(1), particles)):
            for part in rows.split(max(1, chunk // k)) if len(rows) else ():
                completions, log_w = self.ancestral_with_observed(x[part], missing[part], k)
                pick = torch.distributions.Categorical(logits=log_w).sample()  # (b,)
                out[part] = torch.where(missing[part], completions[torch.arange(len(part)), pick], x[part])
        return out

    @torch.no_grad()
    def missing_nll(self, x, missing, particles=32, chunk=4096):
        """(B,) -log p(x_m | x_o) = -log p(x) + log p(x_o): exact, -sum_{i missing} log p(x_i |
        x_<i), where every missing pixel follows every observed one; for any other mask an
        importance-sampling estimate, log p(x_o) ~ log (1/K sum_k w_k) with the K = `particles`
        weights of complete()'s ancestral passes (an unbiased estimate of p(x_o) inside the log,
        so the estimate of -log p(x_m | x_o) is low in expectation, by a gap that shrinks as K
        grows: docs/inpainting.md measures it)."""
        target = x.round().long()
        log_p = F.log_softmax(self.logits(target), -1).gather(2, target[..., None]).squeeze(2)  # (B, 64)
        nll = -(log_p * missing).sum(1)
        rows = (~self.follows_observed(missing)).nonzero().squeeze(1)
        for part in rows.split(max(1, chunk // particles)) if len(rows) else ():
            _, log_w = self.ancestral_with_observed(x[part], missing[part], particles)  # (b, K)
            log_observed = torch.logsumexp(log_w, 1) - math.log(particles)  # log p(x_o), estimated
            nll[part] = -log_p[part].sum(1) + log_observed
        return nll


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    # the small members learn slowly: a high learning rate, and a cap of 60 epochs for the time budget
    # (the ensemble is still improving there: docs/choices.md, ARM); EMA 0.99 for evaluation
    runs.main(ARM, __doc__, argv, epochs=60, batch_size=64, lr=7e-3, patience=10, ema=0.99, gif_every=10,
              val_every=5)


if __name__ == "__main__":
    main()
