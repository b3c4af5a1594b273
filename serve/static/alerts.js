// Live alerts view: when the service follows the alert topic, each new alert arrives as a
// server-sent event and becomes a card: the image read back from its source record, the
// served model's reconstruction and heatmap, score, p-value, model version and time.
import { call, details, element, figure, pngSource, token } from "./api.js";

const MAX_CARDS = 50;

function alertCard(alert) {
  const where = `${alert.topic}/${alert.partition}/${alert.offset}`;
  const when = alert.timestamp_ms ? new Date(alert.timestamp_ms).toLocaleString() : "?";
  const pictures = alert.image_png
    ? element("div", { class: "pictures" },
        figure(pngSource(alert.image_png), "image", "input"),
        figure(pngSource(alert.reconstruction_png), "reconstruction", "reconstruction"),
        figure(pngSource(alert.heatmap_png), "anomaly map", "heatmap"))
    : element("p", { class: "error" }, `image not shown: ${alert.image_error}`);
  return element(
    "article",
    { class: "card alert-card anomaly", "data-source": where },
    pictures,
    element("p", {}, element("span", { class: "verdict anomaly" }, "anomaly"), " ", where),
    details([
      ["score", Number(alert.score).toPrecision(5)],
      ["p-value", Number(alert.p_value).toPrecision(3)],
      ["model", String(alert.model_version)],
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
