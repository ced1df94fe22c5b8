"""The user layer: commands that combine the run's router (index/) with a trained model (train/).

    python -m hmem.query   which blocks a text fetches, and the documents behind them
    python -m hmem.ask     a question in: the model's answer and the memory block that holds it

Nothing in index/, pipeline/ or train/ imports this package.
"""
