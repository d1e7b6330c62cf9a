// The live feed: one EventSource per tab, closed while the tab is hidden (browsers allow
// about six connections per host over HTTP/1.1). Text only: every field is set with
// textContent, never as HTML, because AE titles and error texts come from other systems.
"use strict";
(function () {
  const list = document.getElementById("feed");
  if (!list) return;
  const state = document.getElementById("feed-state");
  const source = list.dataset.source;
  const MAX = 500;
  let es = null;
  let last = null;

  function line(rec) {
    const li = document.createElement("li");
    li.dataset.event = rec.event || "";
    if (rec.sop_instance_uid) li.dataset.sop = rec.sop_instance_uid;
    const bits = [rec.at || "", rec.event || "?"];
    if (rec.destination) bits.push("dest=" + rec.destination);
    if (rec.sop_instance_uid) bits.push("sop=" + rec.sop_instance_uid);
    for (const [k, v] of Object.entries(rec)) {
      if (["seq", "at", "event", "destination", "sop_instance_uid"].includes(k)) continue;
      if (v === null || typeof v === "object") continue;
      bits.push(k + "=" + v);
    }
    li.textContent = bits.join(" ");
    return li;
  }

  function open() {
    if (es) return;
    es = new EventSource(last === null ? source : source + "?since=" + encodeURIComponent(last));
    es.onopen = () => { state.textContent = "live"; };
    es.onerror = () => { state.textContent = "reconnecting"; };
    es.addEventListener("hermes", (e) => {
      let rec;
      try { rec = JSON.parse(e.data); } catch (err) { return; }
      last = rec.seq;
      list.insertBefore(line(rec), list.firstChild);
      while (list.children.length > MAX) list.removeChild(list.lastChild);
    });
  }

  function close() {
    if (es) { es.close(); es = null; state.textContent = "paused (tab hidden)"; }
  }

  document.addEventListener("visibilitychange", () => (document.hidden ? close() : open()));
  open();
})();
