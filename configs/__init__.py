"""Built-in run configurations (YAML), installed as cbd_fast.configs."""
