"""Evaluation of single agent vs team vs distilled model: accuracy, cost, self-correction; reports."""
