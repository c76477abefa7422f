"""The shipped data as a package, ``ftadvisor_data`` (pyproject maps that name to this folder).

Model configs (``models/``), the GPU table (``gpus.csv``), the decision rules (``rules.yaml``) and the demo
datasets (``datasets/``). Read them with ``ftcore.paths.data_path(...)``, never relative to the checkout.
"""
