"""The Helm chart: lint, render with the default and a production-like values file, validate
every manifest against the Kubernetes schemas offline, and check what the service needs of it."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from order_viewer.adapters.http.auth import protected_mode_problem
from order_viewer.adapters.http.forwarded import trusted_networks
from order_viewer.config import Settings, tracing_enabled
from tests.deploy.conftest import CHART, PRODUCTION_VALUES

# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest schemas.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
VALUES_FILES = {"default": None, "production": PRODUCTION_VALUES}
SETTINGS = {name.upper() for name in Settings.model_fields}
# Settings of the HTTP authentication, which the chart passes on without knowing their values.
AUTH_SETTINGS = {"HTTP_AUTH", "HTTP_TOKENS_FILE"}
SECRET_SETTINGS = {"DATABASE_URL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"}
SECRET_SETTINGS |= {"KAFKA_SSL_KEY_PASSWORD"}
Manifests = dict[tuple[str, str], dict[str, Any]]


def helm_command(helm: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *arguments], capture_output=True, text=True, check=False, timeout=120
    )


def template_arguments(values: Path | None, settings: tuple[str, ...], kube: str) -> list[str]:
    arguments = ["template", "order-viewer", str(CHART), "--kube-version", kube]
    if values is not None:
        arguments += ["--values", str(values)]
    for setting in settings:
        arguments += ["--set", setting]
    return arguments


@cache
def _render(helm: Path, values: Path | None, settings: tuple[str, ...], kube: str) -> Manifests:
    result = helm_command(helm, *template_arguments(values, settings, kube))
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    manifests = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    assert len(manifests) == len(documents), "two manifests of one kind share a name"
    return manifests


def render(
    helm: Path, values: Path | None = None, *settings: str, kube: str = KUBE_VERSIONS[-1]
) -> Manifests:
    return _render(helm, values, settings, kube)


def render_error(helm: Path, *settings: str) -> str:
    result = helm_command(helm, *template_arguments(None, settings, KUBE_VERSIONS[-1]))
    assert result.returncode != 0, f"rendered although {settings} is refused"
    return result.stderr


def one(manifests: Manifests, kind: str) -> dict[str, Any]:
    [found] = [doc for (doc_kind, _), doc in manifests.items() if doc_kind == kind]
    return found


def container(manifests: Manifests) -> dict[str, Any]:
    [found] = one(manifests, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = found
    return result


def env_of(manifests: Manifests) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container(manifests)["env"]}


def volume_of(manifests: Manifests, name: str) -> dict[str, Any]:
    volumes = one(manifests, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    [found] = [volume for volume in volumes if volume["name"] == name]
    result: dict[str, Any] = found
    return result


def mount_of(manifests: Manifests, name: str) -> str:
    [found] = [m for m in container(manifests)["volumeMounts"] if m["name"] == name]
    path: str = found["mountPath"]
    return path


# ------------------------------------------------------------------ lint, render, schemas


@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_helm_lint_passes_strictly(helm: Path, values: Path | None) -> None:
    arguments = ["lint", "--strict", str(CHART)]
    if values is not None:
        arguments += ["--values", str(values)]
    result = helm_command(helm, *arguments)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_every_manifest_validates_against_the_kubernetes_schemas(
    helm: Path, values: Path | None, kube: str
) -> None:
    manifests = render(helm, values, kube=kube)
    for (kind, name), manifest in manifests.items():
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema ships with Kubernetes; checked below
        try:
            kubernetes_validate.validate(manifest, kube, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{kind} {name} is invalid for Kubernetes {kube}: {error.message}")


def test_the_schema_validation_rejects_a_broken_manifest(helm: Path) -> None:
    statefulset = one(render(helm), "StatefulSet")
    broken = {**statefulset, "spec": {**statefulset["spec"], "replicas": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)
    unknown = {**statefulset, "spec": {**statefulset["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, KUBE_VERSIONS[-1], strict=True)


def test_the_default_render_is_what_the_values_describe(helm: Path) -> None:
    manifests = render(helm)
    assert {kind for kind, _ in manifests} == {
        "ConfigMap",
        "Job",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    }
    assert one(manifests, "StatefulSet")["spec"]["replicas"] == 3


# ------------------------------------------------------------------ the StatefulSet


@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_each_pod_name_is_its_group_instance_id(helm: Path, values: Path | None) -> None:
    manifests = render(helm, values)
    statefulset = one(manifests, "StatefulSet")
    instance_id = env_of(manifests)["KAFKA_GROUP_INSTANCE_ID"]
    assert instance_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    governing = manifests[("Service", statefulset["spec"]["serviceName"])]
    assert governing["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_probes_resources_and_selectors_fit_together(helm: Path, values: Path | None) -> None:
    manifests = render(helm, values)
    statefulset = one(manifests, "StatefulSet")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    selector = statefulset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["maxUnavailable"] == 1
    for (kind, _), service in manifests.items():
        if kind == "Service":
            assert service["spec"]["selector"] == selector
            assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]

    main = container(manifests)
    [port] = main["ports"]
    assert port["name"] == "http"
    assert env_of(manifests)["HTTP_PORT"]["value"] == str(port["containerPort"])
    assert env_of(manifests)["HTTP_HOST"]["value"] == "0.0.0.0"
    assert main["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["args"] == ["serve"]
    assert {"cpu", "memory"} <= set(main["resources"]["requests"])
    assert "memory" in main["resources"]["limits"]
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_the_topic_has_at_least_as_many_partitions_as_replicas(
    helm: Path, values: Path | None
) -> None:
    manifests = render(helm, values)
    partitions = int(one(manifests, "ConfigMap")["data"]["KAFKA_TOPIC_PARTITIONS"])
    assert one(manifests, "StatefulSet")["spec"]["replicas"] <= partitions


@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_the_pods_get_only_settings_the_service_accepts(helm: Path, values: Path | None) -> None:
    manifests = render(helm, values)
    plain = dict(one(manifests, "ConfigMap")["data"])
    assert container(manifests)["envFrom"] == [
        {"configMapRef": {"name": one(manifests, "ConfigMap")["metadata"]["name"]}}
    ]
    for name, entry in env_of(manifests).items():
        assert name in SETTINGS | AUTH_SETTINGS, f"{name} is no setting of the service"
        if "value" in entry and name not in AUTH_SETTINGS:
            plain[name] = entry["value"]
    assert set(plain) <= SETTINGS
    plain["KAFKA_GROUP_INSTANCE_ID"] = "order-viewer-0"
    Settings(_env_file=None, **{name.lower(): value for name, value in plain.items()})


@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_secrets_come_from_secrets_only(helm: Path, values: Path | None) -> None:
    manifests = render(helm, values)
    env = env_of(manifests)
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
    for name in SECRET_SETTINGS & set(env):
        assert set(env[name]) == {"name", "valueFrom"}, f"{name} given as a plain value"
        assert "secretKeyRef" in env[name]["valueFrom"]
    assert not SECRET_SETTINGS & set(one(manifests, "ConfigMap")["data"])
    assert not any(kind == "Secret" for kind, _ in manifests), "the chart makes no Secret"


# ------------------------------------------------------------------ optional parts


def test_the_production_values_wire_sasl_tls_and_the_token_file(helm: Path) -> None:
    manifests = render(helm, PRODUCTION_VALUES)
    env = env_of(manifests)
    assert env["KAFKA_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512"
    for name, key in (("KAFKA_SASL_USERNAME", "username"), ("KAFKA_SASL_PASSWORD", "password")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": "order-viewer-kafka-sasl",
            "key": key,
        }
    tls_dir = mount_of(manifests, "kafka-tls")
    assert env["KAFKA_SSL_CA_LOCATION"]["value"] == f"{tls_dir}/ca.crt"
    assert volume_of(manifests, "kafka-tls")["secret"]["secretName"] == "order-viewer-kafka-tls"
    assert "KAFKA_SSL_CERTIFICATE_LOCATION" not in env
    tokens_dir = mount_of(manifests, "http-tokens")
    assert env["HTTP_TOKENS_FILE"]["value"] == f"{tokens_dir}/tokens"
    assert env["HTTP_AUTH"] == {"name": "HTTP_AUTH", "value": "token"}


def test_the_pods_behind_the_ingress_count_each_client_not_the_controller(helm: Path) -> None:
    """The deployment pattern the chart documents: the ingress controller's pods trusted to
    name the client; none by default, where the header is ignored."""
    production = one(render(helm, PRODUCTION_VALUES), "ConfigMap")["data"]
    [network] = trusted_networks(production["HTTP_TRUSTED_PROXIES"])
    assert network.is_private
    assert network.prefixlen >= 16
    assert "HTTP_TRUSTED_PROXIES" not in one(render(helm), "ConfigMap")["data"]


def test_http_auth_mode_and_a_token_file_secret_are_passed_on(helm: Path) -> None:
    manifests = render(
        helm,
        None,
        "httpAuth.mode=token",
        "httpAuth.tokensSecret=api-tokens",
        "httpAuth.tokensKey=tokens.txt",
    )
    env = env_of(manifests)
    assert env["HTTP_AUTH"] == {"name": "HTTP_AUTH", "value": "token"}
    directory = mount_of(manifests, "http-tokens")
    assert env["HTTP_TOKENS_FILE"]["value"] == f"{directory}/tokens.txt"
    volume = volume_of(manifests, "http-tokens")["secret"]
    assert volume["secretName"] == "api-tokens"
    assert volume["items"] == [{"key": "tokens.txt", "path": "tokens.txt"}]
    [mount] = [m for m in container(manifests)["volumeMounts"] if m["name"] == "http-tokens"]
    assert mount["readOnly"] is True
    # Without the Secret, nothing of it is rendered.
    anonymous = render(helm, None, *ANONYMOUS, "httpAuth.tokensSecret=")
    assert "HTTP_TOKENS_FILE" not in env_of(anonymous)
    assert "http-tokens" not in {m["name"] for m in container(anonymous)["volumeMounts"]}


# Values under which the service starts on the pods' 0.0.0.0; each is a complete HTTP_AUTH mode.
JWT = (
    "httpAuth.mode=jwt",
    "settings.HTTP_JWT_JWKS_URL=https://idp.example.com/jwks.json",
    "settings.HTTP_JWT_ISSUER=https://idp.example.com/",
    "settings.HTTP_JWT_AUDIENCE=order-viewer",
)
ANONYMOUS = ("httpAuth.mode=none", "settings.HTTP_ALLOW_ANONYMOUS=true")
STARTING = {
    "default": (None, ()),
    "production": (PRODUCTION_VALUES, ()),
    "jwt": (None, JWT),
    "anonymous": (None, ANONYMOUS),
    "anonymous-empty-mode": (None, ("httpAuth.mode=", "settings.HTTP_ALLOW_ANONYMOUS=true")),
}


@pytest.mark.parametrize(("values", "settings"), STARTING.values(), ids=STARTING.keys())
def test_the_rendered_pods_pass_the_services_start_checks(
    helm: Path, values: Path | None, settings: tuple[str, ...]
) -> None:
    manifests = render(helm, values, *settings)
    environment = dict(one(manifests, "ConfigMap")["data"])
    for name, entry in env_of(manifests).items():
        if "value" in entry:
            environment[name] = entry["value"]
        elif name == "KAFKA_GROUP_INSTANCE_ID":
            environment[name] = "order-viewer-0"
        elif name == "DATABASE_URL":
            environment[name] = "postgresql://order_viewer@db/order_viewer"
        else:
            environment[name] = "from-a-secret"
    parsed = Settings(_env_file=None, **{name.lower(): v for name, v in environment.items()})
    assert (
        protected_mode_problem(
            parsed.http_auth, parsed.http_host, allow_anonymous=parsed.http_allow_anonymous
        )
        is None
    )


def test_kafka_client_certificates_come_with_their_key_and_its_password(helm: Path) -> None:
    manifests = render(
        helm,
        None,
        "kafka.tls.existingSecret=kafka-client",
        "kafka.tls.certificateKey=tls.crt",
        "kafka.tls.keyKey=tls.key",
        "kafka.tls.keyPasswordKey=key-password",
    )
    env = env_of(manifests)
    directory = mount_of(manifests, "kafka-tls")
    assert env["KAFKA_SSL_CERTIFICATE_LOCATION"]["value"] == f"{directory}/tls.crt"
    assert env["KAFKA_SSL_KEY_LOCATION"]["value"] == f"{directory}/tls.key"
    assert env["KAFKA_SSL_KEY_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kafka-client",
        "key": "key-password",
    }


def test_the_consumer_group_protocol_renders_without_static_membership(helm: Path) -> None:
    manifests = render(
        helm, None, "settings.KAFKA_GROUP_PROTOCOL=consumer", "staticMembership=false"
    )
    assert "KAFKA_GROUP_INSTANCE_ID" not in env_of(manifests)
    Settings(_env_file=None, kafka_group_protocol="consumer")


def test_the_migrations_run_once_per_release_before_the_pods(helm: Path) -> None:
    manifests = render(helm)
    job = one(manifests, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    [migrate] = pod["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == container(manifests)["image"]
    env = {entry["name"]: entry for entry in migrate["env"]}
    assert env["DATABASE_URL"] == env_of(manifests)["DATABASE_URL"]
    # A pre-install hook runs before the release's ConfigMap and ServiceAccount exist.
    assert "envFrom" not in migrate
    assert "serviceAccountName" not in pod
    selector = one(manifests, "StatefulSet")["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert "Job" not in {kind for kind, _ in render(helm, None, "migrations.enabled=false")}


def test_the_service_monitor_scrapes_each_pod_once_through_the_headless_service(
    helm: Path,
) -> None:
    manifests = render(helm, PRODUCTION_VALUES)
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        service
        for (kind, _), service in manifests.items()
        if kind == "Service" and wanted.items() <= service["metadata"]["labels"].items()
    ]
    assert [service["spec"]["clusterIP"] for service in selected] == ["None"]
    assert selected[0]["spec"]["publishNotReadyAddresses"] is True
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in selected[0]["spec"]["ports"]}
    assert "ServiceMonitor" not in {kind for kind, _ in render(helm)}


def test_the_service_monitor_sends_a_bearer_token_from_its_secret(helm: Path) -> None:
    [endpoint] = one(render(helm, PRODUCTION_VALUES), "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "order-viewer-metrics-token", "key": "token"},
    }
    jwt = render(
        helm,
        None,
        *JWT,
        "serviceMonitor.enabled=true",
        "serviceMonitor.bearerTokenSecret.name=scrape",
        "serviceMonitor.bearerTokenSecret.key=access-token",
    )
    [endpoint] = one(jwt, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"] == {"name": "scrape", "key": "access-token"}
    # Without authentication /metrics is open: no token to send.
    anonymous = render(helm, None, *ANONYMOUS, "serviceMonitor.enabled=true")
    [endpoint] = one(anonymous, "ServiceMonitor")["spec"]["endpoints"]
    assert "authorization" not in endpoint


# ------------------------------------------------------------------ refused values


@pytest.mark.parametrize(
    "setting",
    [
        "settings.DATABASE_URL=postgresql://order_viewer:s3cr3t-value@db:5432/order_viewer",
        "settings.KAFKA_SASL_PASSWORD=s3cr3t-value",
        "settings.KAFKA_SASL_USERNAME=s3cr3t-value",
        "settings.KAFKA_SSL_KEY_PASSWORD=s3cr3t-value",
        "settings.HTTP_TOKENS_FILE=/s3cr3t-value/tokens",
    ],
)
def test_a_secret_among_the_plain_settings_is_refused_without_echoing_it(
    helm: Path, setting: str
) -> None:
    error = render_error(helm, setting)
    assert f"{setting.split('=', maxsplit=1)[0]}: secrets come from Kubernetes Secrets" in error
    assert "s3cr3t-value" not in error


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (("settings.HTTP_PORT=9000",), "settings.HTTP_PORT is set by the chart"),
        (("settings.KAFKA_GROUP_INSTANCE_ID=x",), "settings.KAFKA_GROUP_INSTANCE_ID is set"),
        (("settings.HTTP_AUTH=required",), "settings.HTTP_AUTH is set by the chart"),
        (("database.existingSecret=",), "database.existingSecret"),
        (("settings.KAFKA_GROUP_PROTOCOL=consumer",), "staticMembership needs"),
        (
            ("kafka.tls.existingSecret=kafka-client", "kafka.tls.certificateKey=tls.crt"),
            "certificateKey and keyKey go together",
        ),
        (
            ("kafka.tls.existingSecret=kafka-client", "kafka.tls.keyPasswordKey=pw"),
            "keyPasswordKey needs kafka.tls.keyKey",
        ),
        (("httpAuth.mode=",), "httpAuth.mode is empty or none: the pods listen on 0.0.0.0"),
        (("httpAuth.mode=none",), "httpAuth.mode is empty or none"),
        (
            ("httpAuth.mode=none", "settings.HTTP_ALLOW_ANONYMOUS=false"),
            "httpAuth.mode is empty or none",
        ),
        (
            ("httpAuth.mode=none", "settings.HTTP_ALLOW_ANONYMOUS=yes please"),
            "httpAuth.mode is empty or none",
        ),
        (("httpAuth.mode=required",), 'httpAuth.mode="required": the service takes none'),
        (("httpAuth.mode=Token",), 'httpAuth.mode="Token": the service takes none'),
        (("httpAuth.mode=true",), 'httpAuth.mode="true": the service takes none'),
        (("httpAuth.tokensSecret=",), "httpAuth.mode=token needs httpAuth.tokensSecret"),
        (("httpAuth.mode=jwt",), "httpAuth.mode=jwt needs settings.HTTP_JWT_JWKS_URL"),
        (JWT[:3], "httpAuth.mode=jwt needs settings.HTTP_JWT_AUDIENCE"),
        (
            ("serviceMonitor.enabled=true",),
            "serviceMonitor.bearerTokenSecret.name: with httpAuth.mode=token, /metrics needs",
        ),
        (
            (*JWT, "serviceMonitor.enabled=true"),
            "serviceMonitor.bearerTokenSecret.name: with httpAuth.mode=jwt",
        ),
        (
            (
                "serviceMonitor.enabled=true",
                "serviceMonitor.bearerTokenSecret.name=scrape",
                "serviceMonitor.bearerTokenSecret.key=",
            ),
            "serviceMonitor.bearerTokenSecret.key: name the Secret's key",
        ),
    ],
)
def test_values_the_service_would_refuse_fail_the_render(
    helm: Path, settings: tuple[str, ...], message: str
) -> None:
    assert message in render_error(helm, *settings)


def test_opentelemetrys_variables_reach_every_pod_as_given_and_nothing_else_goes_there(
    helm: Path,
) -> None:
    assert not any(name.startswith("OTEL_") for name in one(render(helm), "ConfigMap")["data"])
    production = one(render(helm, PRODUCTION_VALUES), "ConfigMap")["data"]
    traced = {name: value for name, value in production.items() if name.startswith("OTEL_")}
    assert traced == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.01",
    }
    assert tracing_enabled(Settings(_env_file=None, **{k.lower(): v for k, v in traced.items()}))
    sdk_only = one(render(helm, None, "otel.OTEL_SERVICE_NAME=orders-eu"), "ConfigMap")["data"]
    assert sdk_only["OTEL_SERVICE_NAME"] == "orders-eu"
    for setting, message in [
        ("otel.DATABASE_URL=postgresql://x", "otel.DATABASE_URL: only OpenTelemetry's OTEL_*"),
        ("otel.otel_service_name=x", "otel.otel_service_name: only OpenTelemetry's OTEL_*"),
    ]:
        assert message in render_error(helm, setting)
    assert "otel.OTEL_SDK_DISABLED is also under settings" in render_error(
        helm, "otel.OTEL_SDK_DISABLED=true", "settings.OTEL_SDK_DISABLED=false"
    )
