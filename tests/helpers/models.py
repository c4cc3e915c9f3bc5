"""The tiny classifier the unlearning and strategy tests share: small enough for exact float64 Hessians."""

import torch
import torch.nn.functional as F

D_IN, H, C = 3, 4, 3


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(D_IN, H)
        self.fc = torch.nn.Linear(H, C)

    def forward(self, x):
        return self.fc(torch.tanh(self.l1(x)))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
