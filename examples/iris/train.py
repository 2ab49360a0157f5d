"""Train a small classifier on the iris flowers, the way a PyTorch tutorial reader would.

Nothing here knows about Kiln: it trains, tests and saves a state_dict.
"""

import argparse

import torch
from model import IrisNet
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch import nn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", default="iris.pt")
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = load_iris(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0)
    x_train, x_test = torch.tensor(x_train).float(), torch.tensor(x_test).float()
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

    model = IrisNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        optimizer.zero_grad()
        loss = loss_fn(model(x_train), y_train)
        loss.backward()
        optimizer.step()
        if epoch % 50 == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")
    torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
