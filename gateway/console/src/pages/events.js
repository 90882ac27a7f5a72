// Events: topics with the lag of each consumer group, dead letters with their
// reason and attempts, and redrive / purge.
import { can, get, post } from "../api.js";
import { h, replace, errorBox, when, table, actionButton, flash } from "../ui.js";

const enc = encodeURIComponent;

export async function eventsPage(root) {
  const topicsBox = h("section", { class: "card", "aria-labelledby": "topics-h" });
  const lettersBox = h("section", { class: "card", "aria-labelledby": "dl-h", id: "dead-letters" });
  const notice = h("div", { "aria-live": "polite" });
  replace(root, h("h1", {}, "Events"), notice, topicsBox, lettersBox);
  const redrive = can("events.deadletters.redrive");
  const purge = can("events.deadletters.purge");

  async function loadTopics() {
    let topics;
    try {
      topics = (await get("/v1/events/topics", { pageSize: 200 })).topics || [];
    } catch (err) {
      replace(topicsBox, h("h2", { id: "topics-h" }, "Topics"), errorBox(err));
      return [];
    }
    const stats = await Promise.all(
      topics.map((t) => get(`/v1/events/topics/${enc(t.name)}/stats`).then((r) => r.stats, () => null)),
    );
    const rows = [];
    topics.forEach((t, i) => {
      const s = stats[i] || { groups: [] };
      const groups = s.groups?.length ? s.groups : [null];
      groups.forEach((g, j) =>
        rows.push(
          h(
            "tr",
            { "data-topic": t.name, "data-group": g?.group || "" },
            j === 0 ? h("th", { scope: "row", rowspan: groups.length }, t.name) : null,
            j === 0 ? h("td", { class: "num", rowspan: groups.length }, t.length) : null,
            j === 0
              ? h(
                  "td",
                  { class: "num", rowspan: groups.length },
                  h("a", { href: "#dead-letters", onclick: () => loadLetters(t.name) }, s.deadLetterCount || "0"),
                )
              : null,
            h("td", {}, g ? g.group : "—"),
            h("td", { class: "num lag" }, g ? g.lag : ""),
            h("td", { class: "num" }, g ? g.pending : ""),
            h("td", { class: "num" }, g ? g.consumerCount : ""),
          ),
        ),
      );
    });
    replace(
      topicsBox,
      h("h2", { id: "topics-h" }, "Topics"),
      table("Topics and the lag of each consumer group", ["Topic", "Length", "Dead letters", "Group", "Lag", "Pending", "Consumers"], rows, "No topic yet."),
    );
    return topics;
  }

  async function loadLetters(topic) {
    let letters;
    try {
      letters = (await get(`/v1/events/topics/${enc(topic)}/deadLetters`, { pageSize: 200 })).deadLetters || [];
    } catch (err) {
      replace(lettersBox, h("h2", { id: "dl-h" }, `Dead letters of ${topic}`), errorBox(err));
      return;
    }
    const act = async (verb, body, past) => {
      try {
        const r = await post(`/v1/events/topics/${enc(topic)}/deadLetters:${verb}`, body);
        flash(notice, `${past} ${r.redrivenCount ?? r.purgedCount ?? 0} dead letter(s) of ${topic}.`);
      } catch (err) {
        flash(notice, err.message, "error");
      }
      await loadTopics();
      await loadLetters(topic);
    };
    const rows = letters.map((d) =>
      h(
        "tr",
        { "data-dead-letter": d.deadLetterId },
        h("td", { class: "mono small" }, d.deadLetterId),
        h("td", {}, d.group),
        h("td", {}, d.envelope?.type || ""),
        h("td", {}, d.reason),
        h("td", { class: "num" }, d.attempts),
        h("td", {}, when(d.deadLetterTime)),
        h(
          "td",
          { class: "actions" },
          actionButton("Redrive", { allowed: redrive, run: () => act("redrive", { ids: { ids: [d.deadLetterId] } }, "Redrove") }),
          actionButton("Purge", {
            allowed: purge,
            confirmText: `Delete dead letter ${d.deadLetterId} for good?`,
            run: () => act("purge", { ids: { ids: [d.deadLetterId] } }, "Purged"),
          }),
        ),
      ),
    );
    replace(
      lettersBox,
      h("h2", { id: "dl-h" }, `Dead letters of ${topic}`),
      letters.length
        ? h(
            "p",
            { class: "actions" },
            actionButton("Redrive all", { allowed: redrive, run: () => act("redrive", { all: true }, "Redrove") }),
            actionButton("Purge all", {
              allowed: purge,
              confirmText: `Delete every dead letter of ${topic} for good?`,
              run: () => act("purge", { all: true }, "Purged"),
            }),
          )
        : null,
      table(`Dead letters of ${topic}`, ["Id", "Group", "Event type", "Reason", "Attempts", "Dead-lettered (UTC)", "Actions"], rows, "No dead letter."),
    );
  }

  const topics = await loadTopics();
  const first = topics.find((t) => t.name) ;
  if (first) {
    const withLetters = (await Promise.all(topics.map((t) => get(`/v1/events/topics/${enc(t.name)}/stats`).then((r) => r.stats, () => null))))
      .find((s) => s && Number(s.deadLetterCount) > 0);
    await loadLetters(withLetters ? withLetters.topic : first.name);
  } else {
    replace(lettersBox, h("h2", { id: "dl-h" }, "Dead letters"), h("p", { class: "empty" }, "No topic yet."));
  }
}
