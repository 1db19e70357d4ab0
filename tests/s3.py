"""A real S3-compatible server for the test session: moto's server mode on 127.0.0.1 (it honours conditional PUTs,
``If-None-Match: *``), one bucket, dummy credentials. The environment variables that point clients (obstore,
TensorStore, boto3) at it are set only inside the tests that ask for them (:func:`s3_env`)."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path

BUCKET = "lake-tests"


@dataclasses.dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]

    def new_root(self) -> str:
        """A fresh, empty lake root in the bucket."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def start(config_dir: Path):
    """Starts the server on a free loopback port and creates the bucket; returns ``(server, S3Server)``."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log lines in test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    empty = config_dir / "aws-config"
    empty.write_text("")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
           # no ~/.aws files here: point the SDKs at an empty one instead of letting them log its absence
           "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    return server, S3Server(endpoint, env)
