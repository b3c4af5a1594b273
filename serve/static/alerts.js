// Live alerts view: when the service follows the alert topic, each new alert arrives as a
// server-sent event and becomes a card: the image read back from its source record, the
// served model's reconstruction and heatmap, score, p-value, model version and time. The map
// is drawn by the model this service serves, which after a worker's hot swap may not be the
// one that raised the alert: the card says which model drew it, and when it is not the
// alert's.
import { call, details, element, figure, pngSource, token } from "./api.js";

const MAX_CARDS = 50;

// Which model drew the reconstruction and map, against the one that raised the alert.
function mapBy(alert) {
  if (alert.explained_by_alert_model) return `${alert.served_model_version} (the alert's model)`;
  return `${alert.served_model_version}, not the alert's model ${alert.model_version} ` +
    "(not loaded in this service)";
}

function alertCard(alert) {
  const where = `${alert.topic}/${alert.partition}/${alert.offset}`;
  const when = alert.timestamp_ms ? new Date(alert.timestamp_ms).toLocaleString() : "?";
  const pictures = alert.image_png
    ? element("div", { class: "pictures" },
        figure(pngSource(alert.image_png), "image", "input"),
        figure(pngSource(alert.reconstruction_png), "reconstruction", "reconstruction"),
        figure(pngSource(alert.heatmap_png), "anomaly map", "heatmap"))
    : element("p", { class: "error" }, `image not shown: ${alert.image_error}`);
  const other = alert.image_png && !alert.explained_by_alert_model;
  return element(
    "article",
    {
      class: other ? "card alert-card anomaly other-model" : "card alert-card anomaly",
      "data-source": where,
      "data-map-by": alert.served_model_version ?? "",
    },
    pictures,
    element("p", {}, element("span", { class: "verdict anomaly" }, "anomaly"), " ", where),
    details([
      ["score", Number(alert.score).toPrecision(5)],
      ["p-value", Number(alert.p_value).toPrecision(3)],
      ["alert by model", String(alert.model_version)],
      ...(alert.image_png ? [["map by model", mapBy(alert)]] : []),
      ["time", when],
      ["id", alert.id ?? alert.key ?? "-"],
    ]),
  );
}

export async function setUpAlerts() {
  const status = document.getElementById("alerts-status");
  const cards = document.getElementById("alert-cards");
  let state;
  try {
    state = await call("/v1/alerts");
  } catch (error) {
    status.textContent = `live alerts unavailable: ${error.message}`;
    return;
  }
  if (!state.enabled) {
    status.textContent = "Live alerts are off: start the service with --live-alerts " +
      "(serve.live_alerts: true) and the stream settings of your workers.";
    return;
  }
  const query = token() ? `?access_token=${encodeURIComponent(token())}` : "";
  const events = new EventSource(`/v1/alerts/stream${query}`);
  let count = 0;
  events.addEventListener("open", () => {
    status.textContent = `following ${state.alert_topic}: ${count} alert(s) so far`;
  });
  events.addEventListener("alert", (event) => {
    count += 1;
    cards.prepend(alertCard(JSON.parse(event.data)));
    while (cards.children.length > MAX_CARDS) cards.lastChild.remove();
    status.textContent = `following ${state.alert_topic}: ${count} alert(s) so far`;
  });
  events.addEventListener("error", () => {
    status.textContent = `connection to ${state.alert_topic} lost; reconnecting…`;
  });
}
