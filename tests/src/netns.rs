//! Network namespaces for tests of agents on two hosts (filled in by the netns harness).
