"""Judge training pipeline: mining, features, fitting, evaluation (later issue)."""
