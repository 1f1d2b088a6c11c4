from tests.fixtures import deployment_factory, kafka_broker, simulator  # noqa: F401
