"""The agent configuration: value types (`settings`), strict YAML with line-numbered
errors (`strict_yaml`), seed lists (`seeds`) and the loader that ties them (`loader`)."""
