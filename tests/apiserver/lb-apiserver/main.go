// lb-apiserver: a loopback-only Kubernetes API server for lb's integration
// tests. It is the real k8s.io/apiserver generic server (etcd3 storage, watch,
// resourceVersions, 410 Expired, conflicts, server-side apply) serving exactly
// three resources: core/v1 services and nodes (cluster-scoped), and
// discovery.k8s.io/v1 endpointslices.
// There is no validation, defaulting, authentication or authorization: tests
// write complete objects. Built from Debian's Go source packages by build.sh.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/apiserver/pkg/endpoints/openapi"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/storage/names"
	"k8s.io/apiserver/pkg/util/compatibility"
	openapicommon "k8s.io/kube-openapi/pkg/common"
	openapiutil "k8s.io/kube-openapi/pkg/util"
	"k8s.io/kube-openapi/pkg/validation/spec"
)

var (
	scheme = runtime.NewScheme()
	codecs = serializer.NewCodecFactory(scheme)
)

func init() {
	must(corev1.AddToScheme(scheme))
	must(discoveryv1.AddToScheme(scheme))
	// The external types double as the internal version: no conversions.
	scheme.AddKnownTypes(schema.GroupVersion{Group: "", Version: runtime.APIVersionInternal},
		&corev1.Service{}, &corev1.ServiceList{}, &corev1.Node{}, &corev1.NodeList{})
	scheme.AddKnownTypes(schema.GroupVersion{Group: "discovery.k8s.io", Version: runtime.APIVersionInternal},
		&discoveryv1.EndpointSlice{}, &discoveryv1.EndpointSliceList{})
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	scheme.AddUnversionedTypes(schema.GroupVersion{Group: "", Version: "v1"},
		&metav1.Status{}, &metav1.APIVersions{}, &metav1.APIGroupList{}, &metav1.APIGroup{}, &metav1.APIResourceList{})
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

// strategy accepts every object as written.
type strategy struct {
	runtime.ObjectTyper
	names.NameGenerator
	clusterScoped bool
}

func (s strategy) NamespaceScoped() bool                                          { return !s.clusterScoped }
func (strategy) PrepareForCreate(context.Context, runtime.Object)                 {}
func (strategy) Validate(context.Context, runtime.Object) field.ErrorList         { return nil }
func (strategy) WarningsOnCreate(context.Context, runtime.Object) []string        { return nil }
func (strategy) Canonicalize(runtime.Object)                                      {}
func (strategy) AllowCreateOnUpdate() bool                                        { return false }
func (strategy) PrepareForUpdate(context.Context, runtime.Object, runtime.Object) {}
func (strategy) ValidateUpdate(context.Context, runtime.Object, runtime.Object) field.ErrorList {
	return nil
}
func (strategy) WarningsOnUpdate(context.Context, runtime.Object, runtime.Object) []string {
	return nil
}
func (strategy) AllowUnconditionalUpdate() bool { return true }

func newStore(optsGetter generic.RESTOptionsGetter, resource, singular string, clusterScoped bool, newFunc, newListFunc func() runtime.Object) *genericregistry.Store {
	s := strategy{scheme, names.SimpleNameGenerator, clusterScoped}
	gr := schema.GroupResource{Resource: resource}
	store := &genericregistry.Store{
		NewFunc:                   newFunc,
		NewListFunc:               newListFunc,
		DefaultQualifiedResource:  gr,
		SingularQualifiedResource: schema.GroupResource{Resource: singular},
		CreateStrategy:            s,
		UpdateStrategy:            s,
		DeleteStrategy:            s,
		TableConvertor:            rest.NewDefaultTableConvertor(gr),
	}
	must(store.CompleteWithOptions(&generic.StoreOptions{RESTOptions: optsGetter}))
	return store
}

// Minimal OpenAPI: every served type is an object that keeps unknown fields,
// enough for the field manager (managedFields, server-side apply).
func definitions(openapicommon.ReferenceCallback) map[string]openapicommon.OpenAPIDefinition {
	out := map[string]openapicommon.OpenAPIDefinition{}
	for _, sample := range []interface{}{
		&corev1.Service{}, &corev1.ServiceList{}, &corev1.Node{}, &corev1.NodeList{},
		&discoveryv1.EndpointSlice{}, &discoveryv1.EndpointSliceList{},
		&metav1.Status{}, &metav1.DeleteOptions{}, &metav1.WatchEvent{}, &metav1.Patch{}, &metav1.APIResourceList{},
		&metav1.APIGroupList{}, &metav1.APIGroup{}, &metav1.APIVersions{}, &version.Info{},
	} {
		out[openapiutil.GetCanonicalTypeName(sample)] = openapicommon.OpenAPIDefinition{Schema: spec.Schema{
			SchemaProps:      spec.SchemaProps{Type: []string{"object"}},
			VendorExtensible: spec.VendorExtensible{Extensions: spec.Extensions{"x-kubernetes-preserve-unknown-fields": true}},
		}}
	}
	return out
}

func main() {
	etcd := flag.String("etcd", "http://127.0.0.1:2379", "etcd client URL")
	port := flag.Int("port", 6443, "secure port on 127.0.0.1")
	certDir := flag.String("cert-dir", "", "directory for the self-signed serving certificate")
	flag.Parse()

	codec := codecs.LegacyCodec(corev1.SchemeGroupVersion, discoveryv1.SchemeGroupVersion)
	o := genericoptions.NewRecommendedOptions("/registry/lb", codec)
	o.Etcd.StorageConfig.Transport.ServerList = []string{*etcd}
	o.SecureServing.BindAddress = net.ParseIP("127.0.0.1")
	o.SecureServing.BindPort = *port
	o.SecureServing.ServerCert.CertDirectory = *certDir
	o.Authentication = nil
	o.Authorization = nil
	o.Admission = nil
	o.CoreAPI = nil
	o.Features.EnablePriorityAndFairness = false
	must(o.SecureServing.MaybeDefaultWithSelfSignedCerts("localhost", nil, []net.IP{net.ParseIP("127.0.0.1")}))

	config := genericapiserver.NewRecommendedConfig(codecs)
	config.EffectiveVersion = compatibility.DefaultBuildEffectiveVersion()
	namer := openapi.NewDefinitionNamer(scheme)
	config.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(definitions, namer)
	config.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(definitions, namer)
	must(o.ApplyTo(config))

	server, err := config.Complete().New("lb-apiserver", genericapiserver.NewEmptyDelegate())
	must(err)

	core := genericapiserver.NewDefaultAPIGroupInfo("", scheme, metav1.ParameterCodec, codecs)
	core.VersionedResourcesStorageMap["v1"] = map[string]rest.Storage{
		"services": newStore(config.RESTOptionsGetter, "services", "service", false,
			func() runtime.Object { return &corev1.Service{} }, func() runtime.Object { return &corev1.ServiceList{} }),
		"nodes": newStore(config.RESTOptionsGetter, "nodes", "node", true,
			func() runtime.Object { return &corev1.Node{} }, func() runtime.Object { return &corev1.NodeList{} }),
	}
	must(server.InstallLegacyAPIGroup("/api", &core))

	discovery := genericapiserver.NewDefaultAPIGroupInfo(discoveryv1.GroupName, scheme, metav1.ParameterCodec, codecs)
	discovery.VersionedResourcesStorageMap["v1"] = map[string]rest.Storage{
		"endpointslices": newStore(config.RESTOptionsGetter, "endpointslices", "endpointslice", false,
			func() runtime.Object { return &discoveryv1.EndpointSlice{} }, func() runtime.Object { return &discoveryv1.EndpointSliceList{} }),
	}
	must(server.InstallAPIGroup(&discovery))

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := server.PrepareRun().RunWithContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
