"""Train the digit classifier that scores samples of the digits model, and export it as an evaluator graph.

    python scripts/train_classifier.py --data data/digits_train.npz --held_out data/digits_ref.npz \
        --out models/digits32/classifier.pb

Prints the accuracy on the held-out set (the reference batch, drawn with a seed disjoint from training).
Bad input (flags, data sets, an --out that cannot be written) is one `error: ...` line and exit status 2, before
training.
"""
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluations.digit_classifier import DigitClassifier, export_graph, graph_logits, predict
from ldm import cli
from ldm.data.digits import read_set
from ldm.util import write_atomic


def train(images, labels, steps, batch_size=64, lr=2e-3, seed=0):
    """Adam with a cosine learning-rate decay on random batches of the training set."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    classifier = DigitClassifier()
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    images = torch.from_numpy(images)
    labels = torch.from_numpy(labels)
    bar = tqdm(range(steps), desc="classifier")
    for _ in bar:
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        loss = F.cross_entropy(classifier(images[idx].permute(0, 3, 1, 2).float()), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return classifier.eval()


def read_data(path, flag):
    """Images and labels of a digits .npz; one that is not is a UsageError naming the flag."""
    try:
        return read_set(path)
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"{flag} {e}") from None


@cli.one_line_failures
def main(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/digits_train.npz")
    parser.add_argument("--held_out", default="data/digits_ref.npz")
    parser.add_argument("--out", default="models/digits32/classifier.pb")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.steps < 1:
            raise cli.UsageError(f"--steps must be at least 1, not {args.steps}")
        if args.seed < 0:
            raise cli.UsageError(f"--seed must be at least 0, not {args.seed}")
        cli.check_output_file(args.out, "--out")
        images, labels = read_data(args.data, "--data")
        held_images, held_labels = read_data(args.held_out, "--held_out")
    except cli.UsageError as e:
        return cli.report(e)
    start = time.time()
    classifier = train(images, labels, args.steps, seed=args.seed)
    accuracy = (predict(classifier, held_images) == held_labels).mean()
    graph = export_graph(classifier)
    graph_accuracy = (graph_logits(graph, held_images).argmax(1) == held_labels).mean()
    write_atomic(args.out, lambda f: f.write(graph))
    print(f"classifier: {args.steps} steps in {(time.time() - start) / 60:.1f} min; held-out accuracy "
          f"{accuracy:.4f} (PyTorch), {graph_accuracy:.4f} (exported graph) on {len(held_labels)} images; "
          f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
