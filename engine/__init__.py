"""AutoJudge engine."""
