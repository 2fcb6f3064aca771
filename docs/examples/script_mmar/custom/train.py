"""A plain PyTorch training loop, federated by the five lines marked (1)-(5).

Run by the site's training worker (config_fed_client.json: "script": "custom/train.py").
Each site draws its own data (three classes of 2-D points, in a mix that differs by site),
so the sites are non-IID and the federation learns more than any one of them.
"""

from __future__ import annotations

import argparse
import zlib

import torch
from net import Net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fltui.client as flc  # (1)


def site_data(seed: int, n: int) -> TensorDataset:
    """Three Gaussian classes; this site sees mostly one of them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    mix = torch.full((3,), 0.15)
    mix[seed % 3] = 0.7
    labels = torch.multinomial(mix, n, replacement=True, generator=g)
    points = centres[labels] + torch.randn(n, 2, generator=g)
    return TensorDataset(points, labels)


def evaluate(net: nn.Module, loader: DataLoader) -> dict[str, float]:
    net.eval()
    correct = seen = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((net(x).argmax(dim=1) == y).sum())
            seen += len(y)
    net.train()
    return {"accuracy": correct / seen}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    seed = zlib.crc32(flc.site_name().encode())  # demo data: each site draws its own
    train_loader = DataLoader(site_data(seed, 512), batch_size=32, shuffle=True)
    val_loader = DataLoader(site_data(seed + 1, 256), batch_size=256)
    net = Net()
    loss_fn = nn.CrossEntropyLoss()

    flc.init()  # (2)
    while flc.is_running():  # (3)
        net.load_state_dict(flc.receive().params)  # (4)
        if flc.is_evaluate():  # (optional) the global model, other sites' models
            flc.send(metrics=evaluate(net, val_loader))
            continue
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
        steps, total = 0, args.epochs * len(train_loader)
        for epoch in range(args.epochs):
            running = 0.0
            for i, (x, y) in enumerate(train_loader, 1):
                optimizer.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                optimizer.step()
                steps += 1
                running += loss.item()
                flc.progress(steps, total, loss=running / i)  # (optional) the progress bar
            flc.log({"train_loss": running / i}, step=epoch + 1)  # (optional) epoch metrics
        flc.send(net.state_dict(), n_iter=steps, metrics=evaluate(net, val_loader))  # (5)


if __name__ == "__main__":
    main()
