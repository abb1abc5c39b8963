"""The ``gradeflow`` command and its tools: demo, local workers, rule tools and the offline audit."""
